//! `cri-systemd-init`: the daemon's `init` and `exec-in` subcommands in a binary that loads only
//! the init crate (see `init::helper`). Like them, single-threaded from the start.

use std::process::ExitCode;

use init::helper::Invocation;

fn main() -> ExitCode {
    // First, whatever the arguments: a container process must not open this process's
    // /proc/<pid>/exe (a `#!/proc/self/exe` script runs this binary with arguments of its own).
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("{}: cannot make the process not dumpable: {e}", init::helper::BINARY);
        return ExitCode::from(1);
    }
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    match Invocation::parse(&args) {
        Ok(Invocation::Init(spec)) => init::run(&spec),
        Ok(Invocation::ExecIn(args)) => init::exec_in::run(&args),
        Ok(Invocation::BuildId) => {
            println!("{}", init::helper::BUILD_ID);
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("{}: {message}", init::helper::BINARY);
            ExitCode::from(2)
        }
    }
}
