//! Errors: every failure names what was attempted, so a user without the CANN logs can tell a
//! missing runtime from a missing symbol from a failing call.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::error_names::ERROR_NAMES;
use crate::loader::{Candidate, SET_ENV_HINT};

/// Anything the AscendCL layer can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// The library is in none of the places looked.
    #[error(
        "no AscendCL runtime found: {file} is not in {}{}; `{SET_ENV_HINT}` (the CANN toolkit's environment script) usually fixes this",
        list_looked(looked),
        list_unset(unset)
    )]
    NotFound {
        /// The library file name.
        file: &'static str,
        /// Every place looked, in order.
        looked: Vec<Candidate>,
        /// Search variables that were not set.
        unset: Vec<&'static str>,
    },
    /// The file exists but `dlopen` refused it (wrong architecture, missing dependencies).
    #[error("cannot load the AscendCL library {}: {reason}; if a dependency is missing, `{SET_ENV_HINT}` usually fixes this", path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// The loader's message.
        reason: String,
    },
    /// The library lacks a function this crate calls.
    #[error("the AscendCL library {} has no symbol {symbol} (is it a CANN version this build supports?)", path.display())]
    MissingSymbol {
        /// The function.
        symbol: &'static str,
        /// The library.
        path: PathBuf,
    },
    /// An AscendCL call returned a non-zero `aclError`.
    #[error("{call}{} failed: {}{}", in_parens(context), code_text(*code), recent_text(recent))]
    Call {
        /// The C function, e.g. `"aclrtMalloc"`.
        call: &'static str,
        /// What it was asked (sizes, device), possibly empty.
        context: String,
        /// The `aclError` it returned.
        code: i32,
        /// `aclGetRecentErrMsg()` right after the failure, when the runtime had one.
        recent: Option<String>,
    },
    /// Arguments refused before any call (shapes, lengths, buffers of another device).
    #[error("{op}: {message}")]
    Invalid {
        /// The safe-layer operation.
        op: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl AclError {
    /// The `aclError` code of a failed call.
    pub fn code(&self) -> Option<i32> {
        match self {
            AclError::Call { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub(crate) fn invalid(op: &'static str, message: impl Into<String>) -> Self {
        AclError::Invalid {
            op,
            message: message.into(),
        }
    }
}

/// The header name of an `aclError` code (`ACL_ERROR_*`, `ACL_ERROR_RT_*`, `ACL_ERROR_GE_*`).
pub fn error_name(code: i32) -> Option<&'static str> {
    ERROR_NAMES
        .iter()
        .find(|(c, _)| *c == i64::from(code))
        .map(|(_, name)| *name)
}

fn code_text(code: i32) -> String {
    match error_name(code) {
        Some(name) => format!("{name} ({code})"),
        None => {
            format!("error {code} (not a code of the AscendCL headers this crate was built from)")
        }
    }
}

fn in_parens(context: &str) -> String {
    if context.is_empty() {
        String::new()
    } else {
        format!(" ({context})")
    }
}

fn recent_text(recent: &Option<String>) -> String {
    match recent {
        Some(m) => format!("; runtime says: {m}"),
        None => String::new(),
    }
}

fn list_looked(looked: &[Candidate]) -> String {
    let mut out = String::new();
    for (i, c) in looked.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{} ({})", c.path.display(), c.origin);
    }
    if looked.is_empty() {
        out.push_str("any searched place");
    }
    out
}

fn list_unset(unset: &[&'static str]) -> String {
    if unset.is_empty() {
        return String::new();
    }
    let names: Vec<String> = unset.iter().map(|v| format!("${v}")).collect();
    format!("; not set: {}", names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_from_every_header_have_names() {
        assert_eq!(error_name(100000), Some("ACL_ERROR_INVALID_PARAM"));
        assert_eq!(error_name(207001), Some("ACL_ERROR_RT_MEMORY_ALLOCATION"));
        assert_eq!(error_name(145000), Some("ACL_ERROR_GE_PARAM_INVALID"));
        assert_eq!(error_name(0), None);
        assert_eq!(error_name(123), None);
    }

    #[test]
    fn a_call_error_names_the_call_the_code_and_the_runtime_message() {
        let e = AclError::Call {
            call: "aclrtMalloc",
            context: "64 bytes on device 1".into(),
            code: 207001,
            recent: Some("out of memory".into()),
        };
        assert_eq!(
            e.to_string(),
            "aclrtMalloc (64 bytes on device 1) failed: ACL_ERROR_RT_MEMORY_ALLOCATION (207001); runtime says: out of memory"
        );
        let e = AclError::Call {
            call: "aclInit",
            context: String::new(),
            code: 42,
            recent: None,
        };
        assert!(e
            .to_string()
            .starts_with("aclInit failed: error 42 (not a code"));
    }
}
