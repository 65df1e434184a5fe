//! `cri-systemd-init`, the helper binary: `init` and `exec-in` in a process that loads only this
//! crate. They run at every container start and every ExecSync; the daemon's binary, with its gRPC,
//! TLS and TPM code, costs about 2 ms more per exec than this one (its dynamic relocations touch
//! ~500 pages before `main`, this one's ~150; measured in README, "Where a start's time goes"). The
//! daemon seals it beside its own binary and runs it only when [`BUILD_ID`] matches its own;
//! otherwise it runs these subcommands itself, as before.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::exec_in::ExecInArgs;

/// The helper's file name, beside the daemon's binary.
pub const BINARY: &str = "cri-systemd-init";
/// A fingerprint of this crate's sources (build.rs): the daemon and the helper agree on
/// `init.json` and exec-in's protocol when theirs are equal.
pub const BUILD_ID: &str = env!("INIT_BUILD_ID");
/// Prints [`BUILD_ID`].
pub const BUILD_ID_FLAG: &str = "--build-id";

/// What the helper was asked to do, from its arguments (the program name left out). The daemon's
/// binary parses `init` and `exec-in` with this too, so the two take the same command lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// `init SPEC`
    Init(PathBuf),
    /// `exec-in [--tty] INIT_SPEC UNIT MAIN_PID -- COMMAND...`
    ExecIn(ExecInArgs),
    /// `--build-id`
    BuildId,
}

impl Invocation {
    pub fn parse(args: &[OsString]) -> Result<Invocation, String> {
        let text = |arg: &OsString| arg.to_str().map(str::to_string).ok_or_else(|| format!("not UTF-8: {arg:?}"));
        match args.first().and_then(|a| a.to_str()) {
            Some(BUILD_ID_FLAG) if args.len() == 1 => Ok(Invocation::BuildId),
            Some(crate::SUBCOMMAND) if args.len() == 2 => Ok(Invocation::Init(PathBuf::from(&args[1]))),
            Some(crate::exec_in::SUBCOMMAND) => {
                let mut rest = &args[1..];
                let tty = rest.first().is_some_and(|a| a == "--tty");
                if tty {
                    rest = &rest[1..];
                }
                let [init_spec, unit, main_pid, separator, command @ ..] = rest else {
                    return Err("exec-in: want [--tty] INIT_SPEC UNIT MAIN_PID -- COMMAND...".into());
                };
                if separator != "--" || command.is_empty() {
                    return Err("exec-in: want [--tty] INIT_SPEC UNIT MAIN_PID -- COMMAND...".into());
                }
                let main_pid = text(main_pid)?.parse().map_err(|e| format!("exec-in: main pid {main_pid:?}: {e}"))?;
                Ok(Invocation::ExecIn(ExecInArgs {
                    init_spec: PathBuf::from(init_spec),
                    unit: text(unit)?,
                    main_pid,
                    tty,
                    command: command.iter().map(text).collect::<Result<_, _>>()?,
                }))
            }
            _ => Err(format!(
                "usage: {BINARY} init SPEC | exec-in [--tty] INIT_SPEC UNIT MAIN_PID -- COMMAND... | {BUILD_ID_FLAG}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Invocation, String> {
        Invocation::parse(&args.iter().map(OsString::from).collect::<Vec<_>>())
    }

    #[test]
    fn the_daemons_command_lines_parse() {
        assert_eq!(parse(&["init", "/x/init.json"]), Ok(Invocation::Init("/x/init.json".into())));
        assert_eq!(parse(&["--build-id"]), Ok(Invocation::BuildId));
        let exec = ExecInArgs {
            init_spec: "/x/init.json".into(),
            unit: "cri-a.service".into(),
            main_pid: 42,
            tty: true,
            command: vec!["sh".into(), "-c".into(), "--".into()],
        };
        assert_eq!(
            parse(&["exec-in", "--tty", "/x/init.json", "cri-a.service", "42", "--", "sh", "-c", "--"]),
            Ok(Invocation::ExecIn(exec.clone()))
        );
        let plain = parse(&["exec-in", "/x/init.json", "cri-a.service", "42", "--", "true"]).unwrap();
        assert_eq!(plain, Invocation::ExecIn(ExecInArgs { tty: false, command: vec!["true".into()], ..exec }));
    }

    #[test]
    fn anything_else_is_refused() {
        for args in [
            &[][..],
            &["init"],
            &["init", "a", "b"],
            &["pod-init"],
            &["exec-in", "/x", "u", "42", "true"],
            &["exec-in", "/x", "u", "42", "--"],
            &["exec-in", "/x", "u", "pid", "--", "true"],
            &["--build-id", "x"],
        ] {
            assert!(parse(args).is_err(), "{args:?} was accepted");
        }
    }

    #[test]
    fn the_build_id_names_the_version_and_a_hash() {
        let (version, hash) = BUILD_ID.rsplit_once('-').unwrap();
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
        assert_eq!(hash.len(), 16);
    }
}
