fn main() -> std::process::ExitCode {
    gs_host::cli::main()
}
