//! The bad-input corpus (issue 10): one table of broken models, manifests, data, plugins and
//! outputs, each run through the real `gs-host` binary. Every case must end with exit code 1
//! (a reported error, not a panic or a signal), an error naming the file/key/tensor at fault
//! and what was expected, no panic text, the source model byte-identical, and nothing created
//! or changed in the case's working directory (no output, no staging directory).
//!
//! The broken inputs are made by the cases themselves from a copy of stories260K (a few
//! hundred KB), so the corpus needs no checked-in files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gs_tests::*;
use serde_json::{json, Map, Value};

/// What a case runs and what its error must say.
struct Setup {
    /// gs-host's arguments.
    args: Vec<String>,
    /// Substrings stderr must contain (the file/key/tensor at fault, and what was expected).
    expect: Vec<String>,
    /// Run under `ulimit -f` with this many 512-byte blocks (a disk that fills up).
    file_size_blocks: Option<u64>,
    /// Why the case cannot run here (printed, and the case is not counted as run).
    skip: Option<String>,
}

struct Case {
    name: &'static str,
    build: fn(&Ctx) -> Setup,
}

/// One case's working directory: `model/` (a copy of stories260K to break), `out` (the output
/// path, which must not exist afterwards), manifests and plugin directories beside them.
struct Ctx {
    work: PathBuf,
    model: PathBuf,
    out: PathBuf,
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl Ctx {
    /// Writes `text` as `run.toml`; returns `["--manifest", path]`.
    fn manifest(&self, text: &str) -> Vec<String> {
        let p = write_manifest(&self.work, text);
        vec!["--manifest".into(), p.display().to_string()]
    }

    /// The standard data-free RTN manifest with `extra` appended.
    fn rtn(&self, extra: &str) -> String {
        format!(
            "{}\n{extra}\n",
            manifest_text(&self.model, &self.out, "[[pipeline]]\nalgorithm = \"rtn\"")
        )
    }

    /// RTN with a `[calibration]` section reading `dataset` (2 windows of 16 tokens).
    fn calibrated(&self, dataset: &Path) -> String {
        manifest_text(
            &self.model,
            &self.out,
            &format!(
                "[calibration]\ndataset = \"{}\"\nnsamples = 2\nseqlen = 16\n\n[[pipeline]]\nalgorithm = \"rtn\"",
                dataset.display()
            ),
        )
    }

    fn st(&self) -> PathBuf {
        self.model.join("model.safetensors")
    }

    fn config(&self) -> PathBuf {
        self.model.join("config.json")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    /// A directory `name` holding `files` (source, file name) — a user's plugin directory.
    fn plugin_dir(&self, name: &str, files: &[(&Path, String)]) -> String {
        let d = self.path(name);
        std::fs::create_dir_all(&d).unwrap();
        for (src, file) in files {
            std::fs::copy(src, d.join(file)).unwrap();
        }
        d.display().to_string()
    }

    /// A misbehaving algorithm from the test plugin, data-free.
    fn misbehave(&self, algorithm: &str, extra: &str) -> Setup {
        let mut args = self.manifest(&format!(
            "{}\n{extra}\n",
            manifest_text(
                &self.model,
                &self.out,
                &format!("[[pipeline]]\nalgorithm = \"{algorithm}\""),
            )
        ));
        args.push("--plugin-dir".into());
        args.push(misbehave_plugin().parent().unwrap().display().to_string());
        Setup::new(args, &[])
    }
}

impl Setup {
    fn new(args: Vec<String>, expect: &[&str]) -> Setup {
        Setup {
            args,
            expect: strs(expect),
            file_size_blocks: None,
            skip: None,
        }
    }

    fn expect(mut self, more: &[&str]) -> Setup {
        self.expect.extend(strs(more));
        self
    }
}

// --- safetensors surgery -------------------------------------------------------------------

/// The header (in file order) and the data section of a safetensors file.
fn read_st(path: &Path) -> (Map<String, Value>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

fn write_st(path: &Path, header: &Map<String, Value>, data: &[u8]) {
    let json = serde_json::to_vec(header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// Rewrites the header of `path` with `f`, keeping the data section.
fn edit_header(path: &Path, f: impl FnOnce(&mut Map<String, Value>)) {
    let (mut h, data) = read_st(path);
    f(&mut h);
    write_st(path, &h, &data);
}

/// Sets element `index` of the f32 tensor `name` in `path` to `value`.
fn poke_f32(path: &Path, name: &str, index: usize, value: f32) {
    let (h, mut data) = read_st(path);
    assert_eq!(h[name]["dtype"], "F32");
    let start = h[name]["data_offsets"][0].as_u64().unwrap() as usize + 4 * index;
    data[start..start + 4].copy_from_slice(&value.to_le_bytes());
    write_st(path, &h, &data);
}

const Q0: &str = "model.layers.0.self_attn.q_proj.weight";
const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";

/// Splits the model's single file into two shards (blocks 0–1 and the embeddings in the
/// first, the rest in the second) with an index; `dup` also stores that tensor in the
/// second shard. Returns the index path.
fn shard(ctx: &Ctx, dup: Option<&str>) -> PathBuf {
    let (h, data) = read_st(&ctx.st());
    let mut shards: [Vec<(String, Value, Vec<u8>)>; 2] = [vec![], vec![]];
    for (name, info) in &h {
        if name == "__metadata__" {
            continue;
        }
        let s = info["data_offsets"][0].as_u64().unwrap() as usize;
        let e = info["data_offsets"][1].as_u64().unwrap() as usize;
        let first = name.starts_with("model.layers.0.")
            || name.starts_with("model.layers.1.")
            || !name.starts_with("model.layers.");
        let entry = (name.clone(), info.clone(), data[s..e].to_vec());
        if Some(name.as_str()) == dup {
            shards[1].push(entry.clone());
        }
        shards[usize::from(!first)].push(entry);
    }
    let mut weight_map = Map::new();
    for (file, tensors) in [SHARD1, SHARD2].iter().zip(&shards) {
        let mut header = Map::new();
        let mut bytes = Vec::new();
        for (name, info, d) in tensors {
            let mut info = info.clone();
            info["data_offsets"] = json!([bytes.len(), bytes.len() + d.len()]);
            bytes.extend(d);
            header.insert(name.clone(), info);
            weight_map.entry(name.clone()).or_insert(json!(file));
        }
        write_st(&ctx.model.join(file), &header, &bytes);
    }
    std::fs::remove_file(ctx.st()).unwrap();
    let index = ctx.model.join("model.safetensors.index.json");
    let doc = json!({"metadata": {"total_size": data.len()}, "weight_map": weight_map});
    std::fs::write(&index, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    index
}

fn edit_index(index: &Path, f: impl FnOnce(&mut Map<String, Value>)) {
    let mut doc: Value = serde_json::from_slice(&std::fs::read(index).unwrap()).unwrap();
    f(doc["weight_map"].as_object_mut().unwrap());
    std::fs::write(index, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
}

fn edit_config(ctx: &Ctx, f: impl FnOnce(&mut Map<String, Value>)) {
    let mut doc: Map<String, Value> =
        serde_json::from_slice(&std::fs::read(ctx.config()).unwrap()).unwrap();
    f(&mut doc);
    std::fs::write(ctx.config(), serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
}

/// Whether this process can write into a directory without write permission (root, or a
/// capability such as CAP_DAC_OVERRIDE): then permissions cannot make a directory unwritable.
fn ignores_permissions(probe_dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let d = probe_dir.join("probe");
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o555)).unwrap();
    let writable = std::fs::write(d.join("x"), b"x").is_ok();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::remove_dir_all(&d).unwrap();
    writable
}

// --- the corpus ----------------------------------------------------------------------------

fn cases() -> Vec<Case> {
    vec![
        // Safetensors files.
        Case {
            name: "safetensors truncated inside the data",
            build: |c| {
                let len = std::fs::metadata(c.st()).unwrap().len();
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(c.st())
                    .unwrap();
                f.set_len(len - 1000).unwrap();
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "model.safetensors",
                        "data_offsets",
                        "out of range",
                        "data section is",
                    ],
                )
            },
        },
        Case {
            name: "safetensors shorter than its length prefix",
            build: |c| {
                std::fs::write(c.st(), b"\x10\0\0").unwrap();
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "model.safetensors",
                        "file is 3 bytes, shorter than the 8-byte header length",
                    ],
                )
            },
        },
        Case {
            name: "safetensors header length beyond the file",
            build: |c| {
                let mut b = std::fs::read(c.st()).unwrap();
                let len = b.len() as u64;
                b[..8].copy_from_slice(&len.to_le_bytes());
                std::fs::write(c.st(), b).unwrap();
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "model.safetensors",
                        "header declares",
                        "bytes of JSON but the file has only",
                    ],
                )
            },
        },
        Case {
            name: "safetensors header length beyond any sane header",
            build: |c| {
                let mut b = std::fs::read(c.st()).unwrap();
                b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                std::fs::write(c.st(), b).unwrap();
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "model.safetensors",
                        "header length 18446744073709551615 exceeds the",
                    ],
                )
            },
        },
        Case {
            name: "safetensors header that is not JSON",
            build: |c| {
                let mut b = std::fs::read(c.st()).unwrap();
                b[8] = b'[';
                b[9] = b'!';
                std::fs::write(c.st(), b).unwrap();
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "model.safetensors",
                        "header is not valid JSON (line 1, column",
                    ],
                )
            },
        },
        Case {
            name: "overlapping data offsets",
            build: |c| {
                edit_header(&c.st(), |h| {
                    let o = h[Q0]["data_offsets"].clone();
                    let (s, e) = (o[0].as_u64().unwrap() - 4, o[1].as_u64().unwrap() - 4);
                    h[Q0]["data_offsets"] = json!([s, e]);
                });
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &["model.safetensors", Q0, "overlaps the previous tensor"],
                )
            },
        },
        Case {
            name: "data offsets beyond the data section",
            build: |c| {
                edit_header(&c.st(), |h| {
                    h[Q0]["data_offsets"] = json!([0, 1u64 << 40]);
                });
                let data = read_st(&c.st()).1.len();
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "model.safetensors",
                        Q0,
                        "[0, 1099511627776] are out of range",
                    ],
                )
                .expect(&[&format!("(data section is {data} bytes)")])
            },
        },
        Case {
            name: "data offsets leaving a gap",
            build: |c| {
                let (mut h, mut data) = read_st(&c.st());
                // Every tensor from q_proj on moves 4 bytes later; 4 stray bytes sit before it.
                let at = h[Q0]["data_offsets"][0].as_u64().unwrap();
                for (name, info) in h.iter_mut() {
                    if name == "__metadata__" {
                        continue;
                    }
                    let s = info["data_offsets"][0].as_u64().unwrap();
                    let e = info["data_offsets"][1].as_u64().unwrap();
                    if s >= at {
                        info["data_offsets"] = json!([s + 4, e + 4]);
                    }
                }
                data.splice(at as usize..at as usize, [0u8; 4]);
                write_st(&c.st(), &h, &data);
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "model.safetensors",
                        Q0,
                        "leaves a gap after the previous tensor",
                    ],
                )
            },
        },
        Case {
            name: "shape that disagrees with the byte length",
            build: |c| {
                edit_header(&c.st(), |h| h[Q0]["shape"] = json!([64, 63]));
                Setup::new(c.manifest(&c.rtn("")), &["model.safetensors", Q0, "shape [64, 63], which is 16128 bytes, but its data_offsets span 16384 bytes"])
            },
        },
        Case {
            name: "dtype that disagrees with the byte length",
            build: |c| {
                edit_header(&c.st(), |h| h[Q0]["dtype"] = json!("BF16"));
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "model.safetensors",
                        Q0,
                        "dtype BF16",
                        "8192 bytes, but its data_offsets span 16384 bytes",
                    ],
                )
            },
        },
        Case {
            name: "unknown dtype",
            build: |c| {
                edit_header(&c.st(), |h| h[Q0]["dtype"] = json!("F33"));
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &["model.safetensors", Q0, "unknown dtype \"F33\""],
                )
            },
        },
        Case {
            name: "integer dtype where a float weight is needed",
            build: |c| {
                edit_header(&c.st(), |h| h[Q0]["dtype"] = json!("I32"));
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        Q0,
                        "model.safetensors has dtype I32",
                        "float checkpoints (BF16, F16, F32)",
                    ],
                )
            },
        },
        Case {
            name: "weight shape that disagrees with config.json",
            build: |c| {
                edit_header(&c.st(), |h| h[Q0]["shape"] = json!([128, 32]));
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[Q0, "[128, 32]", "config.json", "[64, 64]", "disagree"],
                )
            },
        },
        Case {
            name: "linear weight missing from the checkpoint",
            build: |c| {
                edit_header(&c.st(), |h| {
                    let v = h.remove(Q0).unwrap();
                    h.insert("model.layers.0.self_attn.q_proj.weight_renamed".into(), v);
                });
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        &format!("has no tensor \"{Q0}\""),
                        "config.json implies (num_hidden_layers = 5",
                        "the q projection",
                    ],
                )
            },
        },
        Case {
            name: "model directory without weights",
            build: |c| {
                std::fs::remove_file(c.st()).unwrap();
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &["no model.safetensors or model.safetensors.index.json in"],
                )
                .expect(&[&c.model.display().to_string()])
            },
        },
        Case {
            name: "model directory that does not exist",
            build: |c| {
                let text = c.rtn("").replace(
                    &c.model.display().to_string(),
                    &c.path("nowhere").display().to_string(),
                );
                Setup::new(c.manifest(&text), &["nowhere", "does not exist"])
            },
        },
        // Sharded checkpoints.
        Case {
            name: "index naming a missing shard",
            build: |c| {
                shard(c, None);
                std::fs::remove_file(c.model.join(SHARD2)).unwrap();
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "model.safetensors.index.json",
                        &format!("names shard \"{SHARD2}\""),
                        "does not exist",
                    ],
                )
            },
        },
        Case {
            name: "index mapping a tensor to the wrong shard",
            build: |c| {
                let index = shard(c, None);
                edit_index(&index, |m| {
                    m.insert(Q0.into(), json!(SHARD2));
                });
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "model.safetensors.index.json",
                        &format!("maps tensor \"{Q0}\""),
                        SHARD2,
                        "that shard has no such tensor (it is in",
                        SHARD1,
                    ],
                )
            },
        },
        Case {
            name: "index naming a tensor no shard holds",
            build: |c| {
                let index = shard(c, None);
                edit_index(&index, |m| {
                    m.insert("model.layers.9.ghost.weight".into(), json!(SHARD1));
                });
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "model.safetensors.index.json",
                        "maps tensor \"model.layers.9.ghost.weight\"",
                        "that shard has no such tensor",
                    ],
                )
            },
        },
        Case {
            name: "tensor present in two shards",
            build: |c| {
                shard(c, Some("lm_head.weight"));
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "tensor \"lm_head.weight\" is present in two shards",
                        SHARD1,
                        SHARD2,
                    ],
                )
            },
        },
        Case {
            name: "index that is not JSON",
            build: |c| {
                let index = shard(c, None);
                std::fs::write(&index, b"{\"weight_map\": {").unwrap();
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &["invalid JSON in", "model.safetensors.index.json", "line 1"],
                )
            },
        },
        Case {
            name: "index without a weight_map",
            build: |c| {
                let index = shard(c, None);
                std::fs::write(&index, b"{\"metadata\": {}}").unwrap();
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "model.safetensors.index.json",
                        "missing \"weight_map\" object",
                    ],
                )
            },
        },
        Case {
            name: "index naming a shard outside the model directory",
            build: |c| {
                let index = shard(c, None);
                edit_index(&index, |m| {
                    m.insert(Q0.into(), json!("../elsewhere.safetensors"));
                });
                Setup::new(c.manifest(&c.rtn("")), &["model.safetensors.index.json", "\"../elsewhere.safetensors\", which is not a plain file name in the model directory"])
            },
        },
        // config.json.
        Case {
            name: "config.json missing",
            build: |c| {
                std::fs::remove_file(c.config()).unwrap();
                Setup::new(c.manifest(&c.rtn("")), &["config.json: file not found"])
            },
        },
        Case {
            name: "config.json that is not JSON",
            build: |c| {
                std::fs::write(c.config(), b"{\"hidden_size\": 64,,}").unwrap();
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &["invalid JSON in", "config.json at line 1, column"],
                )
            },
        },
        Case {
            name: "config.json missing hidden_size",
            build: |c| {
                edit_config(c, |m| {
                    m.remove("hidden_size");
                });
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &["config.json", "required key \"hidden_size\" is missing"],
                )
            },
        },
        Case {
            name: "config.json missing num_hidden_layers",
            build: |c| {
                edit_config(c, |m| {
                    m.remove("num_hidden_layers");
                });
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "config.json",
                        "required key \"num_hidden_layers\" is missing",
                    ],
                )
            },
        },
        Case {
            name: "config.json with a string where a number belongs",
            build: |c| {
                edit_config(c, |m| {
                    m.insert("hidden_size".into(), json!("64"));
                });
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "\"hidden_size\" in",
                        "config.json",
                        "expected",
                        "found \"64\"",
                    ],
                )
            },
        },
        Case {
            name: "config.json with a negative layer count",
            build: |c| {
                edit_config(c, |m| {
                    m.insert("num_hidden_layers".into(), json!(-5));
                });
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "\"num_hidden_layers\" in",
                        "config.json",
                        "expected",
                        "found -5",
                    ],
                )
            },
        },
        Case {
            name: "key-value heads that do not divide the attention heads",
            build: |c| {
                edit_config(c, |m| {
                    m.insert("num_key_value_heads".into(), json!(3));
                });
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "config.json",
                        "\"num_key_value_heads\" (3) does not divide \"num_attention_heads\" (8)",
                    ],
                )
            },
        },
        Case {
            name: "attention heads that do not divide the hidden size",
            build: |c| {
                edit_config(c, |m| {
                    m.remove("head_dim");
                    m.insert("num_attention_heads".into(), json!(7));
                    m.insert("num_key_value_heads".into(), json!(7));
                });
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "config.json",
                        "\"num_attention_heads\" (7) does not divide \"hidden_size\" (64)",
                    ],
                )
            },
        },
        Case {
            name: "more layers in config.json than in the checkpoint",
            build: |c| {
                edit_config(c, |m| {
                    m.insert("num_hidden_layers".into(), json!(6));
                });
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "has no tensor \"model.layers.5.self_attn.q_proj.weight\"",
                        "config.json implies (num_hidden_layers = 6",
                    ],
                )
            },
        },
        Case {
            name: "unsupported architecture",
            build: |c| {
                edit_config(c, |m| {
                    m.insert("architectures".into(), json!(["GPT2LMHeadModel"]));
                });
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "unsupported architecture",
                        "GPT2LMHeadModel",
                        "config.json",
                        "supported:",
                    ],
                )
            },
        },
        // Non-finite source weights: always refused (docs/manifest.md).
        Case {
            name: "NaN in a linear weight",
            build: |c| {
                poke_f32(&c.st(), Q0, 70, f32::NAN);
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        Q0,
                        "model.safetensors",
                        "holds NaN at index 70 (row 1, column 6)",
                        "only finite weights",
                    ],
                )
            },
        },
        Case {
            name: "infinity in a norm weight",
            build: |c| {
                poke_f32(
                    &c.st(),
                    "model.layers.2.post_attention_layernorm.weight",
                    3,
                    f32::INFINITY,
                );
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &[
                        "model.layers.2.post_attention_layernorm.weight",
                        "holds inf at index 3;",
                        "only finite weights",
                    ],
                )
            },
        },
        // Calibration data and tokenizer.
        Case {
            name: "empty calibration file",
            build: |c| {
                let d = c.path("calib.txt");
                std::fs::write(&d, b"").unwrap();
                Setup::new(
                    c.manifest(&c.calibrated(&d)),
                    &["calib.txt", "[calibration]"],
                )
            },
        },
        Case {
            name: "calibration text shorter than one window",
            build: |c| {
                let d = c.path("calib.txt");
                std::fs::write(&d, b"Once upon a time.").unwrap();
                Setup::new(
                    c.manifest(&c.calibrated(&d)),
                    &["calib.txt", "[calibration]", "16"],
                )
            },
        },
        Case {
            name: "calibration file missing",
            build: |c| {
                let d = c.path("no-such-calib.txt");
                Setup::new(
                    c.manifest(&c.calibrated(&d)),
                    &["no-such-calib.txt", "[calibration]"],
                )
            },
        },
        Case {
            name: "calibration text that is not UTF-8",
            build: |c| {
                let d = c.path("calib.txt");
                std::fs::write(&d, b"Once upon a \xff time").unwrap();
                Setup::new(
                    c.manifest(&c.calibrated(&d)),
                    &["calib.txt", "invalid UTF-8 at byte offset 12"],
                )
            },
        },
        Case {
            name: "pre-tokenized window of the wrong length",
            build: |c| {
                let d = c.path("calib.jsonl");
                let ok: Vec<u32> = (1..=16).collect();
                let short: Vec<u32> = (1..=15).collect();
                std::fs::write(
                    &d,
                    format!(
                        "{}\n{}\n",
                        json!({"input_ids": ok}),
                        json!({"input_ids": short})
                    ),
                )
                .unwrap();
                Setup::new(
                    c.manifest(&c.calibrated(&d)),
                    &["calib.jsonl", "line 2", "15 ids, expected seqlen = 16"],
                )
            },
        },
        Case {
            name: "pre-tokenized id beyond the vocabulary",
            build: |c| {
                let d = c.path("calib.json");
                let mut w: Vec<u32> = (1..=16).collect();
                w[10] = 512;
                std::fs::write(&d, json!({"input_ids": [w.clone(), w]}).to_string()).unwrap();
                Setup::new(c.manifest(&c.calibrated(&d)), &["calib.json", "token 10 of calibration window 0 (0-based) is 512, not below the vocabulary size 512"])
            },
        },
        Case {
            name: "fewer pre-tokenized windows than nsamples",
            build: |c| {
                let d = c.path("calib.json");
                let w: Vec<u32> = (1..=16).collect();
                std::fs::write(&d, json!({"input_ids": [w]}).to_string()).unwrap();
                Setup::new(
                    c.manifest(&c.calibrated(&d)),
                    &[
                        "calib.json",
                        "input_ids has 1 windows, nsamples = 2 requested",
                    ],
                )
            },
        },
        Case {
            name: "tokenizer.json that does not load",
            build: |c| {
                std::fs::write(
                    c.model.join("tokenizer.json"),
                    b"{\"model\": {\"type\": \"Nope\"}}",
                )
                .unwrap();
                let d = root().join("assets/data/tinystories/tinystories-sample.txt");
                Setup::new(
                    c.manifest(&c.calibrated(&d)),
                    &["tokenizer.json", "not a loadable Hugging Face tokenizer"],
                )
            },
        },
        Case {
            name: "tokenizer.json missing when calibration text needs it",
            build: |c| {
                std::fs::remove_file(c.model.join("tokenizer.json")).unwrap();
                let d = root().join("assets/data/tinystories/tinystories-sample.txt");
                Setup::new(c.manifest(&c.calibrated(&d)), &["tokenizer.json"])
            },
        },
        Case {
            name: "evaluation text shorter than one window",
            build: |c| {
                let d = c.path("eval.txt");
                std::fs::write(&d, b"Once upon a time there was a cat.").unwrap();
                Setup::new(
                    c.manifest(&c.rtn(&format!(
                        "[eval]\ndataset = \"{}\"\nseqlen = 512",
                        d.display()
                    ))),
                    &["[eval]", "eval.txt", "is less than one window of 512"],
                )
            },
        },
        // Manifests.
        Case {
            name: "manifest file missing",
            build: |c| {
                Setup::new(
                    vec![
                        "--manifest".into(),
                        c.path("missing.toml").display().to_string(),
                    ],
                    &["cannot read manifest", "missing.toml"],
                )
            },
        },
        Case {
            name: "manifest TOML syntax error",
            build: |c| {
                let text = c.rtn("").replace("[export]", "[export");
                Setup::new(c.manifest(&text), &["run.toml:", "TOML syntax error"])
            },
        },
        Case {
            name: "manifest unknown key",
            build: |c| {
                let text = c.rtn("").replace("[export]\nformat", "[export]\nfromat");
                Setup::new(
                    c.manifest(&text),
                    &[
                        "run.toml:",
                        "unknown key `fromat` in [export]",
                        "did you mean `format`",
                    ],
                )
            },
        },
        Case {
            name: "manifest unknown section",
            build: |c| {
                Setup::new(
                    c.manifest(&c.rtn("[calibraton]\ndataset = \"x\"")),
                    &[
                        "run.toml:",
                        "unknown section [calibraton]",
                        "did you mean [calibration]",
                    ],
                )
            },
        },
        Case {
            name: "manifest value of the wrong type",
            build: |c| {
                let text = c.rtn("").replace(
                    "granularity = \"channel\"",
                    "granularity = \"channel\", bits = \"4\"",
                );
                Setup::new(
                    c.manifest(&text),
                    &["run.toml:", "quant.weights.bits", "expected"],
                )
            },
        },
        Case {
            name: "manifest without [model]",
            build: |c| {
                let path_line = format!("path = \"{}\"\n", c.model.display());
                let text = c.rtn("").replacen(&format!("[model]\n{path_line}"), "", 1);
                Setup::new(
                    c.manifest(&text),
                    &["run.toml:1:1: missing required section [model]"],
                )
            },
        },
        Case {
            name: "manifest with an empty pipeline",
            build: |c| {
                let text = manifest_text(&c.model, &c.out, "pipeline = []");
                // `pipeline = []` must be a top-level key: put it before the first table.
                let text = format!("pipeline = []\n{}", text.replace("pipeline = []", ""));
                Setup::new(c.manifest(&text), &["run.toml:", "pipeline"])
            },
        },
        Case {
            name: "manifest without any pipeline stage",
            build: |c| {
                Setup::new(
                    c.manifest(&manifest_text(&c.model, &c.out, "")),
                    &["run.toml", "[[pipeline]]"],
                )
            },
        },
        Case {
            name: "manifest naming an unknown algorithm",
            build: |c| {
                Setup::new(
                    c.manifest(&manifest_text(
                        &c.model,
                        &c.out,
                        "[[pipeline]]\nalgorithm = \"rnt\"",
                    )),
                    &["run.toml:", "unknown algorithm `rnt`", "did you mean `rtn`"],
                )
            },
        },
        Case {
            name: "manifest override regex that does not compile",
            build: |c| {
                Setup::new(
                    c.manifest(&c.rtn("[[quant.override]]\npattern = \"q_proj(\"\nskip = true")),
                    &["run.toml:", "quant.override[0].pattern", "q_proj("],
                )
            },
        },
        Case {
            name: "group size that does not divide a layer",
            build: |c| {
                let text = c
                    .rtn("")
                    .replace("granularity = \"channel\"", "group_size = 32");
                Setup::new(
                    c.manifest(&text),
                    &[
                        "model.layers.0.mlp.down_proj",
                        "group size 32 does not divide its 172 input columns",
                    ],
                )
            },
        },
        Case {
            name: "manifest bits out of range",
            build: |c| {
                let text = c.rtn("").replace(
                    "granularity = \"channel\"",
                    "granularity = \"channel\", bits = 9",
                );
                Setup::new(c.manifest(&text), &["run.toml:", "quant.weights.bits", "9"])
            },
        },
        Case {
            name: "manifest unknown export format",
            build: |c| {
                let text = c.rtn("").replace("format = \"fake\"", "format = \"gguf\"");
                Setup::new(
                    c.manifest(&text),
                    &["run.toml:", "unknown value `gguf` for `export.format`"],
                )
            },
        },
        Case {
            name: "manifest nsamples of zero",
            build: |c| {
                let d = root().join("assets/data/tinystories/tinystories-sample.txt");
                let text = c.calibrated(&d).replace("nsamples = 2", "nsamples = 0");
                Setup::new(c.manifest(&text), &["run.toml:", "calibration.nsamples"])
            },
        },
        Case {
            name: "algorithm parameter the plugin does not know",
            build: |c| {
                Setup::new(
                    c.manifest(&manifest_text(
                        &c.model,
                        &c.out,
                        "[[pipeline]]\nalgorithm = \"gptq\"\nparams = { dampp = 0.1 }",
                    )),
                    &["gs-gptq", "rejected the parameters of `gptq`", "dampp"],
                )
            },
        },
        Case {
            name: "algorithm needing calibration without [calibration]",
            build: |c| {
                Setup::new(
                    c.manifest(&manifest_text(
                        &c.model,
                        &c.out,
                        "[[pipeline]]\nalgorithm = \"gptq\"",
                    )),
                    &[
                        "run.toml",
                        "`gptq` needs calibration statistics",
                        "[calibration]",
                    ],
                )
            },
        },
        Case {
            name: "quantize --group-size that does not divide a layer",
            build: |c| {
                let args = strs(&[
                    "quantize",
                    &c.model.display().to_string(),
                    "--preset",
                    "w4a16-rtn",
                    "--out",
                    &c.out.display().to_string(),
                    "--group-size",
                    "32",
                ]);
                Setup::new(args, &["--group-size 32 does not divide the 172 input columns of model.layers.0.mlp.down_proj", "1, 2, 4"])
            },
        },
        // Plugins.
        Case {
            name: "plugin file that is not a shared library",
            build: |c| {
                let junk = c.path("junk.so");
                std::fs::write(&junk, b"#!/bin/sh\necho not a library\n").unwrap();
                let dir = c.plugin_dir("plugins", &[(&junk, "libjunk.so".into())]);
                let mut args = c.manifest(&c.rtn(""));
                args.extend(["--plugin-dir".into(), dir]);
                Setup::new(
                    args,
                    &[
                        "libjunk.so",
                        "not a loadable shared library: dlopen failed: ",
                    ],
                )
            },
        },
        Case {
            name: "plugin library without the root module",
            build: |c| {
                let so = fixture("not-a-plugin", "gs_fixture_not_a_plugin");
                let name = lib_file(Path::new(""), "not_a_plugin")
                    .display()
                    .to_string();
                let dir = c.plugin_dir("plugins", &[(&so, name)]);
                let mut args = c.manifest(&c.rtn(""));
                args.extend(["--plugin-dir".into(), dir]);
                Setup::new(
                    args,
                    &[
                        "not_a_plugin",
                        "not a gs-host plugin",
                        "gs_plugin_abi_major",
                    ],
                )
            },
        },
        Case {
            name: "plugin of another ABI major version",
            build: |c| {
                let so = fixture("plugin-abi2", "gs_fixture_abi2");
                let name = lib_file(Path::new(""), "abi2").display().to_string();
                let dir = c.plugin_dir("plugins", &[(&so, name)]);
                let mut args = c.manifest(&c.rtn(""));
                args.extend(["--plugin-dir".into(), dir]);
                Setup::new(args, &["abi2", "major version 2", "major version 1"])
            },
        },
        Case {
            name: "two plugins registering one algorithm",
            build: |c| {
                let rtn = rtn_plugin();
                let a = lib_file(Path::new(""), "rtn_a").display().to_string();
                let b = lib_file(Path::new(""), "rtn_b").display().to_string();
                let dir = c.plugin_dir("plugins", &[(&rtn, a), (&rtn, b)]);
                let mut args = c.manifest(&c.rtn(""));
                args.extend(["--plugin-dir".into(), dir]);
                Setup::new(
                    args,
                    &["`rtn` is registered by two plugins", "rtn_a", "rtn_b"],
                )
            },
        },
        Case {
            name: "plugin sha256 pin mismatch",
            build: |c| {
                let zeros = "0".repeat(64);
                let actual = gs_host::plugins::sha256_file(&rtn_plugin()).unwrap();
                Setup::new(
                    c.manifest(&c.rtn(&format!("[plugins.gs-rtn]\nsha256 = \"{zeros}\""))),
                    &["gs-rtn", &zeros, &actual, "refusing to load it"],
                )
            },
        },
        Case {
            name: "pin naming a plugin that is not loaded",
            build: |c| {
                Setup::new(
                    c.manifest(&c.rtn(&format!(
                        "[plugins.gs-nothing]\nsha256 = \"{}\"",
                        "1".repeat(64)
                    ))),
                    &["pins plugin `gs-nothing`", "no loaded plugin has that name"],
                )
            },
        },
        Case {
            name: "plugin panicking in transform",
            build: |c| {
                c.misbehave("test_panic", "").expect(&[
                    "gs-test-misbehave",
                    "test_panic",
                    "block 0 subset `qkv`",
                    "panicked at tests/plugins/misbehave/src/lib.rs:",
                    "deliberate panic in block 0",
                ])
            },
        },
        Case {
            name: "plugin panicking while parsing its parameters",
            build: |c| {
                c.misbehave("test_panic_create", "").expect(&[
                    "run.toml:8:1: [[pipeline]] stage",
                    "gs-test-misbehave",
                    "test_panic_create",
                    "panicked at tests/plugins/misbehave/src/lib.rs:",
                    "deliberate panic while parsing",
                ])
            },
        },
        Case {
            name: "plugin returning NaN",
            build: |c| {
                c.misbehave("test_nan", "").expect(&[
                    "test_nan",
                    "model.layers.0.self_attn.q_proj",
                    "NaN",
                    "finite",
                ])
            },
        },
        Case {
            name: "plugin returning a wrong shape",
            build: |c| {
                c.misbehave("test_wrong_shape", "")
                    .expect(&["test_wrong_shape", "expected 4096 values, got 4095"])
            },
        },
        Case {
            name: "plugin setting qparams for a norm",
            build: |c| {
                c.misbehave("test_norm_qparams", "").expect(&[
                    "test_norm_qparams",
                    "model.layers.0.input_layernorm",
                    "only a linear layer",
                ])
            },
        },
        Case {
            name: "plugin taking forever",
            build: |c| {
                c.misbehave("test_sleep", "[run]\nstage_timeout_s = 1")
                    .expect(&[
                        "test_sleep",
                        "gs-test-misbehave",
                        "block 0 subset `qkv` (model.layers.0.self_attn.q_proj, ",
                        "did not finish within 1 s ([run] stage_timeout_s)",
                        "no output was written",
                    ])
            },
        },
        // Outputs.
        Case {
            name: "output equal to the source model",
            build: |c| {
                let text = c
                    .rtn("")
                    .replace(&c.out.display().to_string(), &c.model.display().to_string());
                let mut args = c.manifest(&text);
                args.push("--force".into());
                Setup::new(args, &["is the source model directory"])
            },
        },
        Case {
            name: "output inside the source model",
            build: |c| {
                let inside = c.model.join("quantized");
                let text = c
                    .rtn("")
                    .replace(&c.out.display().to_string(), &inside.display().to_string());
                Setup::new(
                    c.manifest(&text),
                    &["quantized", "is inside the source model directory"],
                )
            },
        },
        Case {
            name: "output containing the source model",
            build: |c| {
                let text = c
                    .rtn("")
                    .replace(&c.out.display().to_string(), &c.work.display().to_string());
                let mut args = c.manifest(&text);
                args.push("--force".into());
                Setup::new(args, &["is inside the output"])
            },
        },
        Case {
            name: "output that exists and is not empty",
            build: |c| {
                std::fs::create_dir(&c.out).unwrap();
                std::fs::write(c.out.join("precious.txt"), b"keep").unwrap();
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &["already exists and is not empty; pass --force"],
                )
                .expect(&[&c.out.display().to_string()])
            },
        },
        Case {
            name: "forced output that gs-host did not write",
            build: |c| {
                std::fs::create_dir(&c.out).unwrap();
                std::fs::write(c.out.join("precious.txt"), b"keep").unwrap();
                let mut args = c.manifest(&c.rtn(""));
                args.push("--force".into());
                Setup::new(
                    args,
                    &[
                        "was not written by gs-host",
                        "gs-run.json",
                        "refusing to delete it",
                    ],
                )
            },
        },
        Case {
            name: "failed run into output directories that did not exist",
            build: |c| {
                let deep = c.path("new/deeper/out");
                let text =
                    manifest_text(&c.model, &deep, "[[pipeline]]\nalgorithm = \"test_panic\"");
                let mut args = c.manifest(&text);
                args.push("--plugin-dir".into());
                args.push(misbehave_plugin().parent().unwrap().display().to_string());
                // The runner checks that `new/` is gone too.
                Setup::new(args, &["test_panic", "deliberate panic in block 0"])
            },
        },
        Case {
            name: "output that is a file",
            build: |c| {
                std::fs::write(&c.out, b"a file").unwrap();
                Setup::new(
                    c.manifest(&c.rtn("")),
                    &["exists and is a file, not a directory"],
                )
            },
        },
        Case {
            name: "output whose parent is a file",
            build: |c| {
                let file = c.path("file");
                std::fs::write(&file, b"a file").unwrap();
                let text = c.rtn("").replace(
                    &c.out.display().to_string(),
                    &file.join("out").display().to_string(),
                );
                Setup::new(c.manifest(&text), &["file/out", "Not a directory"])
            },
        },
        Case {
            name: "output directory not writable",
            build: |c| {
                use std::os::unix::fs::PermissionsExt;
                let ro = c.path("readonly");
                std::fs::create_dir(&ro).unwrap();
                let text = c.rtn("").replace(
                    &c.out.display().to_string(),
                    &ro.join("out").display().to_string(),
                );
                let mut s = Setup::new(c.manifest(&text), &["readonly", "Permission denied"]);
                if ignores_permissions(&c.work) {
                    s.skip = Some("this process ignores directory permissions (root or CAP_DAC_OVERRIDE); \"output whose parent is a file\" covers an unwritable output instead".into());
                }
                std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
                s
            },
        },
        Case {
            name: "disk full while writing the weights",
            build: |c| {
                // 64 blocks (32 KiB) of file size: the 1.1 MB weights cannot be written.
                let mut s = Setup::new(
                    c.manifest(&c.rtn("")),
                    &["model.safetensors", "File too large"],
                );
                s.expect.push(c.out.display().to_string());
                s.file_size_blocks = Some(64);
                s
            },
        },
        Case {
            name: "disk full while writing a compressed-tensors checkpoint",
            build: |c| {
                // Streamed shard writes this time; the 128 KiB f32 embeddings do not fit.
                let text = c
                    .rtn("")
                    .replace("format = \"fake\"", "format = \"compressed-tensors\"");
                let mut s = Setup::new(c.manifest(&text), &["File too large"]);
                s.expect.push(c.out.display().to_string());
                s.file_size_blocks = Some(64);
                s
            },
        },
    ]
}

// --- the runner ----------------------------------------------------------------------------

/// Every file (sha256) and directory under `dir`, to prove nothing was created or changed.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                out.insert(rel, "dir".into());
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                use sha2::Digest;
                out.insert(rel, format!("{:x}", sha2::Sha256::digest(&bytes)));
            }
        }
    }
    out
}

/// What running a case gave.
struct Outcome {
    /// What went wrong; empty when the case passed.
    problems: Vec<String>,
    /// `false` when skipped.
    ran: bool,
    took: Duration,
    /// The last line of stderr (the error), for the printed catalog.
    error: String,
}

/// Runs one case.
fn run_case(case: &Case) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().to_path_buf();
    let ctx = Ctx {
        model: copy_model(&work.join("model")),
        out: work.join("out"),
        work: work.clone(),
    };
    let setup = (case.build)(&ctx);
    if let Some(why) = &setup.skip {
        println!("SKIPPED {}: {why}", case.name);
        restore_permissions(&work);
        return Outcome {
            problems: vec![],
            ran: false,
            took: Duration::ZERO,
            error: String::new(),
        };
    }
    let before = snapshot(&work);
    let out_existed = ctx.out.exists();
    let mut cmd = match setup.file_size_blocks {
        None => Command::new(gs_host_bin()),
        Some(blocks) => {
            // SIGXFSZ ignored, so an oversized write fails with EFBIG instead of killing.
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!(
                    "trap '' XFSZ; ulimit -f {blocks}; exec \"$0\" \"$@\""
                ))
                .arg(gs_host_bin());
            c
        }
    };
    let started = Instant::now();
    let (status, err) = run_bounded(
        cmd.args(&setup.args)
            .current_dir(&work)
            .env_remove("GS_PLUGIN_PATH")
            .env_remove("RUST_BACKTRACE")
            .env("RUST_LOG", "warn"),
    );
    let took = started.elapsed();
    let mut problems = Vec::new();
    match status {
        Some(s) if s.code() == Some(1) => {}
        Some(s) => problems.push(format!("exit status {s:?}, expected 1 (a reported error)")),
        None => problems.push(format!("still running after {CASE_LIMIT:?}; killed")),
    }
    for s in &setup.expect {
        if !err.contains(s.as_str()) {
            problems.push(format!("stderr lacks {s:?}"));
        }
    }
    // The panic hook's text (`thread '…' panicked at …`, the backtrace hint); an error
    // message may well say that a plugin panicked.
    let hook_text = err
        .lines()
        .any(|l| l.starts_with("thread '") && l.contains(" panicked at "));
    for (noise, found) in [
        ("a panic message", hook_text),
        ("RUST_BACKTRACE", err.contains("RUST_BACKTRACE")),
        ("a backtrace", err.contains("stack backtrace")),
    ] {
        if found {
            problems.push(format!("stderr contains {noise}"));
        }
    }
    restore_permissions(&work);
    let after = snapshot(&work);
    if after != before {
        let added: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
        let removed: Vec<_> = before.keys().filter(|k| !after.contains_key(*k)).collect();
        let changed: Vec<_> = before
            .iter()
            .filter(|(k, v)| after.get(*k).is_some_and(|w| w != *v))
            .map(|(k, _)| k)
            .collect();
        problems.push(format!(
            "the working directory changed: added {added:?}, removed {removed:?}, changed {changed:?}"
        ));
    }
    if !out_existed && ctx.out.exists() {
        problems.push("the output was left behind".into());
    }
    if !problems.is_empty() {
        problems.push(format!("stderr was:\n{err}"));
    }
    Outcome {
        problems,
        ran: true,
        took,
        error: err.lines().last().unwrap_or_default().to_string(),
    }
}

/// The longest a case may run before it counts as hanging.
const CASE_LIMIT: Duration = Duration::from_secs(60);

/// Runs `cmd` to completion or [`CASE_LIMIT`] (then kills it: `None`); returns its stderr.
fn run_bounded(cmd: &mut Command) -> (Option<std::process::ExitStatus>, String) {
    use std::io::Read;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("gs-host starts");
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = pipe.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let deadline = Instant::now() + CASE_LIMIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap())
}

/// Makes every directory under `dir` writable again (a case may have locked one).
fn restore_permissions(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            restore_permissions(&p);
        }
    }
}

#[test]
fn every_bad_input_is_a_clear_error_leaving_nothing_behind() {
    let cases = cases();
    assert!(cases.len() >= 40, "the corpus has {} cases", cases.len());
    // Build everything once, before the cases run in parallel and are timed.
    let _ = (gs_host_bin(), misbehave_plugin(), rtn_plugin());
    fixture("not-a-plugin", "gs_fixture_not_a_plugin");
    fixture("plugin-abi2", "gs_fixture_abi2");
    let started = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(case) = cases.get(i) else { break };
                let r = run_case(case);
                results.lock().unwrap().push((i, r));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(i, _)| *i);
    let mut failed = Vec::new();
    let mut ran = 0;
    for (i, o) in &results {
        let name = cases[*i].name;
        if o.ran {
            ran += 1;
            println!("{:>6.2}s {name}\n        {}", o.took.as_secs_f64(), o.error);
        }
        if !o.problems.is_empty() {
            failed.push(format!("--- {name}:\n{}", o.problems.join("\n")));
        }
    }
    println!(
        "bad-input corpus: {} cases, {ran} run, {} skipped, {} failed, {:.1}s",
        cases.len(),
        cases.len() - ran,
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(ran >= 40, "only {ran} cases ran");
}

/// Not an error, by design (docs/manifest.md): an override pattern that matches no layer is a
/// warning, so one manifest can serve several architectures. Not counted among the cases.
#[test]
fn an_override_matching_no_layer_is_a_warning_and_the_run_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let text = format!(
        "{}\n[[quant.override]]\npattern = 'cross_attn'\nskip = true\n",
        manifest_text(&stories260k(), &out, "[[pipeline]]\nalgorithm = \"rtn\"")
    );
    let m = write_manifest(dir.path(), &text);
    let o = gs_host(dir.path(), &["--manifest", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("WARN")
            && e.contains("run.toml: [[quant.override]] #1 pattern `cross_attn` matches no layer"),
        "{e}"
    );
    assert!(out.join("model.safetensors").is_file());
}
