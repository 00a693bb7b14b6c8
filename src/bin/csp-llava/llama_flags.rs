//! llama.cpp's command-line habits, applied before clap parses: its multi-letter short flags
//! (`-fa`, `-ngl`, `-ctk`, `-sys`, `-hf` …) are rewritten to their long forms, and the llama.cpp
//! flags csp-llava does not have are named in one line instead of being misread.

use std::ffi::OsString;

use clap::CommandFactory;

use crate::args::Cli;

/// llama.cpp's multi-letter short flags, which clap would read as `-f a` etc.
const LLAMA_SHORT: &[(&str, &str)] = &[
    ("-fa", "--flash-attn"),
    ("-ngl", "--n-gpu-layers"),
    ("-ctk", "--cache-type-k"),
    ("-ctv", "--cache-type-v"),
    ("-ub", "--ubatch-size"),
    ("-sys", "--system"),
    ("-hf", "--hf-repo"),
    ("-hfr", "--hf-repo"),
    ("-hff", "--hf-file"),
    ("-hft", "--hf-token"),
    ("-cnv", "--conversation"),
    ("-no-cnv", "--no-conversation"),
];

/// llama.cpp flags (of `llama-mtmd-cli` and the common arguments) that csp-llava does not take:
/// each gets one line, "csp-llava does not support FLAG (yet)", and exit 2, instead of being
/// misread (`-cnv` as `-c nv`) or reported as unknown. `true`: the flag takes a value.
pub const UNSUPPORTED_LLAMA_FLAGS: &[(&str, bool)] = &[
    // llama-cli's other interactive modes (csp-llava's chat is -cnv / `csp-llava chat`)
    ("-i", false),
    ("--interactive", false),
    ("-if", false),
    ("--interactive-first", false),
    ("-st", false),
    ("--single-turn", false),
    // devices and offload placement
    ("-dev", true),
    ("--device", true),
    ("--list-devices", false),
    ("-ot", true),
    ("--override-tensor", true),
    ("-sm", true),
    ("--split-mode", true),
    ("-ts", true),
    ("--tensor-split", true),
    ("-mg", true),
    ("--main-gpu", true),
    ("--no-mmproj-offload", false),
    ("-nkvo", false),
    ("--no-kv-offload", false),
    ("-cmoe", false),
    ("--cpu-moe", false),
    ("-ncmoe", true),
    ("--n-cpu-moe", true),
    ("--numa", true),
    ("--mlock", false),
    // other model sources and formats
    ("-mu", true),
    ("--model-url", true),
    ("--mmproj-url", true),
    ("--no-mmproj", false),
    ("-dr", true),
    ("--docker-repo", true),
    ("--lora", true),
    ("--lora-scaled", true),
    ("--control-vector", true),
    ("-md", true),
    ("--model-draft", true),
    ("--audio", true),
    // sampling knobs csp-llava has no equivalent of
    ("--mirostat", true),
    ("--dynatemp-range", true),
    ("--typical", true),
    ("--xtc-probability", true),
    ("--dry-multiplier", true),
    ("--samplers", true),
    ("--sampling-seq", true),
    ("--grammar", true),
    ("--grammar-file", true),
    ("-j", true),
    ("--json-schema", true),
    ("--presence-penalty", true),
    ("--frequency-penalty", true),
    ("-l", true),
    ("--logit-bias", true),
    // context and cache management
    ("-kvu", false),
    ("--kv-unified", false),
    ("--keep", true),
    ("--context-shift", false),
    ("--rope-scaling", true),
    ("--rope-scale", true),
    ("--rope-freq-base", true),
    ("--yarn-orig-ctx", true),
    ("-dt", true),
    ("--defrag-thold", true),
    ("-np", true),
    ("--parallel", true),
    ("-tb", true),
    ("--threads-batch", true),
    ("--image-min-tokens", true),
    ("--image-max-tokens", true),
    ("--reasoning-format", true),
    ("--reasoning-budget", true),
    ("-sp", false),
    ("--special", false),
    ("--log-file", true),
];

/// The llama.cpp flag csp-llava does not support, if `args` names one (before `--`, and not as the
/// value of another flag).
pub fn unsupported_llama_flag(args: &[OsString]) -> Option<String> {
    let value_flags = value_taking_flags();
    let mut expect_value = false;
    for a in args.iter().skip(1) {
        let Some(s) = a.to_str() else {
            expect_value = false;
            continue;
        };
        if expect_value {
            expect_value = false;
            continue;
        }
        if s == "--" {
            return None;
        }
        let flag = s.split_once('=').map_or(s, |(f, _)| f);
        if UNSUPPORTED_LLAMA_FLAGS.iter().any(|(f, _)| *f == flag) {
            return Some(flag.to_owned());
        }
        if !s.contains('=') && value_flags.iter().any(|f| f == flag) {
            expect_value = true;
        }
    }
    None
}

/// Rewrites llama.cpp's multi-letter short flags (`-fa on`, `-ngl=99`) to their long forms, but
/// never a value of another flag (`-p -fa` keeps its prompt) nor anything after `--`.
pub fn rewrite_llama_flags(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let value_flags = value_taking_flags();
    let mut out = Vec::new();
    let mut expect_value = false;
    let mut rest_positional = false;
    for (i, arg) in args.into_iter().enumerate() {
        if i == 0 || rest_positional {
            out.push(arg);
            continue;
        }
        let Some(s) = arg.to_str().map(str::to_owned) else {
            expect_value = false;
            out.push(arg);
            continue;
        };
        if expect_value {
            expect_value = false;
            out.push(arg);
            continue;
        }
        if s == "--" {
            rest_positional = true;
            out.push(arg);
            continue;
        }
        let (flag, inline) = match s.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (s.clone(), None),
        };
        let flag = LLAMA_SHORT.iter().find(|(short, _)| *short == flag).map_or(flag, |(_, long)| (*long).to_owned());
        if inline.is_none() && value_flags.iter().any(|f| *f == flag) {
            expect_value = true;
        }
        out.push(match inline {
            Some(v) => format!("{flag}={v}").into(),
            None => flag.into(),
        });
    }
    out
}

/// Every `-x`/`--long` spelling of a flag that takes a value, read from the clap definition.
fn value_taking_flags() -> Vec<String> {
    fn walk(cmd: &clap::Command, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            if a.get_action().takes_values() && !a.is_positional() {
                if let Some(s) = a.get_short() {
                    out.push(format!("-{s}"));
                }
                if let Some(l) = a.get_long() {
                    out.push(format!("--{l}"));
                }
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = Vec::new();
    walk(&Cli::command(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::args::{Command, FaArg};
    use csp_llava::config::{self, CacheType};

    fn parse(args: &[&str]) -> Cli {
        let argv = std::iter::once("csp-llava").chain(args.iter().copied()).map(OsString::from);
        Cli::try_parse_from(rewrite_llama_flags(argv)).expect("parses")
    }

    #[test]
    fn fa_works_as_in_llama_cpp() {
        assert_eq!(parse(&["-fa", "on"]).run.ctx.flash_attn, FaArg::On);
        assert_eq!(parse(&["-fa", "off"]).run.ctx.flash_attn, FaArg::Off);
        assert_eq!(parse(&["-fa=auto"]).run.ctx.flash_attn, FaArg::Auto);
    }

    #[test]
    fn ngl_works_as_in_llama_cpp() {
        assert_eq!(parse(&["-ngl", "33"]).run.model.ngl(), Some(33));
        assert_eq!(parse(&["-ngl", "all"]).run.model.ngl(), Some(config::ALL_LAYERS));
        assert_eq!(parse(&["-ngl=7"]).run.model.ngl(), Some(7));
    }

    #[test]
    fn ctk_ctv_work_as_in_llama_cpp() {
        let c = parse(&["-ctk", "q8_0", "-ctv", "q4_0"]);
        assert_eq!(c.run.ctx.cache_type_k, CacheType::Q8_0);
        assert_eq!(c.run.ctx.cache_type_v, CacheType::Q4_0);
    }

    #[test]
    fn ub_works_as_in_llama_cpp() {
        assert_eq!(parse(&["-ub", "256"]).run.ctx.ubatch_size, vec![256]);
    }

    #[test]
    fn values_that_look_like_flags_are_left_alone() {
        assert_eq!(parse(&["-p", "-fa"]).run.prompt.prompt.as_deref(), Some("-fa"));
        assert_eq!(parse(&["--system", "-ngl", "-fa", "off"]).run.prompt.system.as_deref(), Some("-ngl"));
        assert_eq!(parse(&["-n", "-1"]).run.sampling.n_predict, Some(-1));
    }

    #[test]
    fn sys_and_hf_work_as_in_llama_cpp() {
        let c = parse(&["-sys", "be brief", "-hf", "ggml-org/SmolVLM-256M-Instruct-GGUF:Q8_0", "-hff", "x.gguf"]);
        assert_eq!(c.run.prompt.system.as_deref(), Some("be brief"));
        assert_eq!(c.run.model.hf.hf_repo.as_deref(), Some("ggml-org/SmolVLM-256M-Instruct-GGUF:Q8_0"));
        assert_eq!(c.run.model.hf.hf_file.as_deref(), Some("x.gguf"));
        assert_eq!(parse(&["-hfr", "a/b"]).run.model.hf.hf_repo.as_deref(), Some("a/b"));
        // -s is still the seed
        assert_eq!(parse(&["-s", "7"]).run.sampling.seed, 7);
    }

    #[test]
    fn unsupported_llama_flags_are_named() {
        let argv = |a: &[&str]| -> Vec<OsString> { std::iter::once("csp-llava").chain(a.iter().copied()).map(OsString::from).collect() };
        let named = |a: &[&str]| unsupported_llama_flag(&rewrite_llama_flags(argv(a)));
        assert_eq!(named(&["-i"]).as_deref(), Some("-i"));
        assert_eq!(named(&["-cnv"]), None, "chat mode exists");
        assert_eq!(named(&["-m", "x", "--no-mmproj-offload"]).as_deref(), Some("--no-mmproj-offload"));
        assert_eq!(named(&["-dev=CUDA0"]).as_deref(), Some("-dev"));
        assert_eq!(named(&["-ot", "x=CPU"]).as_deref(), Some("-ot"));
        // values and what follows -- are not flags
        assert_eq!(named(&["-p", "-i"]), None);
        assert_eq!(named(&["-sys", "-dev"]), None);
        assert_eq!(named(&["--", "-i"]), None);
        assert_eq!(named(&["-fa", "on"]), None);
        // every entry of the table is either a valid llama.cpp spelling csp-llava does not define
        let defined = value_taking_flags();
        for (f, _) in UNSUPPORTED_LLAMA_FLAGS {
            assert!(!defined.iter().any(|d| d == f), "{f} is defined by csp-llava");
            assert!(!LLAMA_SHORT.iter().any(|(s, _)| s == f), "{f} is rewritten");
        }
    }

    #[test]
    fn every_command_takes_the_model_and_context_flags() {
        let flags = ["-m", "m.gguf", "--mmproj", "p.gguf", "-ctk", "q8_0", "-ctv", "q8_0", "-ub", "128", "-fa", "on", "-c", "2048", "-ngl", "0", "-t", "3", "-v"];
        let check = |m: &crate::args::ModelFlags, c: &crate::args::ContextFlags| {
            assert_eq!(m.threads(), Some(3));
            assert_eq!(m.ngl(), Some(0));
            assert_eq!((c.cache_type_k, c.cache_type_v, c.ubatch_size.clone(), c.flash_attn, c.ctx_size), (CacheType::Q8_0, CacheType::Q8_0, vec![128], FaArg::On, Some(2048)));
        };
        for cmd in [&["eval", "--data", "x.jsonl"][..], &["calibrate", "--data", "x.jsonl", "--out", "p.json"], &["bench"], &["demo"], &[]] {
            let c = parse(&[cmd, &flags[..]].concat());
            assert_eq!(c.verbose, 1, "{cmd:?}");
            match &c.command {
                Some(Command::Eval(a)) => check(&a.model, &a.ctx),
                Some(Command::Calibrate(a)) => check(&a.model, &a.ctx),
                Some(Command::Bench(a)) => check(&a.model, &a.ctx),
                Some(Command::Demo { run, .. }) => check(&run.model, &run.ctx),
                None => check(&c.run.model, &c.run.ctx),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn subcommand_flags() {
        let c = parse(&["demo", "-fa", "off", "-n", "5"]);
        match c.command {
            Some(Command::Demo { run, .. }) => {
                assert_eq!(run.ctx.flash_attn, FaArg::Off);
                assert_eq!(run.sampling.n_predict, Some(5));
            }
            other => panic!("{other:?}"),
        }
    }
}
