//! seccomp for the container process: the spec's `linux.seccomp` (OCI form) compiled to BPF with
//! `seccompiler` and installed right before the process changes user, as runc does, so that no
//! `no_new_privs` is needed and the filter also binds `exec-in` processes.
//!
//! OCI profiles give each rule its own action; a seccompiler filter has one match and one
//! mismatch action. So a profile becomes a stack of filters: one for its allow rules (mismatch:
//! the default action), then one per other action (mismatch: allow). The kernel runs them all and
//! keeps the most restrictive result, the most recently installed one among equals, so that e.g.
//! `clone3 -> ENOSYS` wins over the default `EPERM`, as the profile means.

use std::collections::BTreeMap;

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator, LinuxSyscall};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

use crate::syscalls;
use crate::{Error, Result};

fn action(action: LinuxSeccompAction, errno: Option<u32>, default_errno: u32) -> Result<SeccompAction> {
    Ok(match action {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(errno.unwrap_or(default_errno)),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => SeccompAction::KillThread,
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        other => return Err(Error::invalid(format!("seccomp action {other} is not supported"))),
    })
}

fn condition(arg: &oci_spec::runtime::LinuxSeccompArg) -> Result<SeccompCondition> {
    let index = u8::try_from(arg.index())
        .map_err(|_| Error::invalid(format!("seccomp argument index {} is out of range", arg.index())))?;
    let (op, value) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
        // OCI: `value` is the mask, `valueTwo` what the masked argument must equal.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (SeccompCmpOp::MaskedEq(arg.value()), arg.value_two().unwrap_or(0)),
    };
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| Error::invalid(format!("seccomp argument: {e}")))
}

/// The rules of one action: per syscall, alternatives (conditions ANDed within each); an empty
/// list matches the syscall whatever its arguments.
#[derive(Default)]
struct Rules {
    by_syscall: BTreeMap<i64, Vec<SeccompRule>>,
    unconditional: std::collections::HashSet<i64>,
}

impl Rules {
    fn add(&mut self, rule: &LinuxSyscall) -> Result<()> {
        let conditions =
            rule.args().as_deref().unwrap_or_default().iter().map(condition).collect::<Result<Vec<_>>>()?;
        for name in rule.names() {
            // As libseccomp: a name this architecture does not have is no error.
            let Some(number) = syscalls::number(name) else { continue };
            if conditions.is_empty() {
                self.unconditional.insert(number);
                self.by_syscall.insert(number, Vec::new());
            } else if !self.unconditional.contains(&number) {
                let rule = SeccompRule::new(conditions.clone())
                    .map_err(|e| Error::invalid(format!("seccomp rule for {name}: {e}")))?;
                self.by_syscall.entry(number).or_default().push(rule);
            }
        }
        Ok(())
    }
}

/// Compiles a profile into the filters to install, in order.
pub(crate) fn compile(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| Error::invalid(format!("seccomp: {e}")))?;
    let default_errno = profile.default_errno_ret().unwrap_or(libc::EPERM as u32);
    let default = action(profile.default_action(), profile.default_errno_ret(), default_errno)?;
    // Rules grouped by their action; allow first.
    let mut groups: Vec<(SeccompAction, Rules)> = vec![(SeccompAction::Allow, Rules::default())];
    for rule in profile.syscalls().as_deref().unwrap_or_default() {
        let rule_action = action(rule.action(), rule.errno_ret(), default_errno)?;
        if rule_action == default {
            continue;
        }
        match groups.iter_mut().find(|(a, _)| *a == rule_action) {
            Some((_, rules)) => rules.add(rule)?,
            None => {
                let mut rules = Rules::default();
                rules.add(rule)?;
                groups.push((rule_action, rules));
            }
        }
    }
    let mut programs = Vec::new();
    for (index, (group_action, rules)) in groups.into_iter().enumerate() {
        let filter = if index == 0 {
            if default == SeccompAction::Allow {
                continue;
            }
            SeccompFilter::new(rules.by_syscall, default.clone(), SeccompAction::Allow, arch)
        } else {
            SeccompFilter::new(rules.by_syscall, SeccompAction::Allow, group_action, arch)
        };
        let filter = filter.map_err(|e| Error::invalid(format!("seccomp filter: {e}")))?;
        programs.push(BpfProgram::try_from(filter).map_err(|e| Error::invalid(format!("seccomp filter: {e}")))?);
    }
    Ok(programs)
}

/// Installs the filters on the calling thread (init and exec-in are single-threaded).
pub(crate) fn install(programs: &[BpfProgram]) -> Result<()> {
    for program in programs {
        seccompiler::apply_filter(program).map_err(|e| Error::invalid(format!("install seccomp filter: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn allowlists_compile_into_a_stack() {
        let p = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["read", "write", "no_such_syscall"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}]},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"}]},
                {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
            ]
        }));
        assert_eq!(compile(&p).unwrap().len(), 2);
        let allow_all = profile(
            serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mount"], "action": "SCMP_ACT_ERRNO"}]}),
        );
        assert_eq!(compile(&allow_all).unwrap().len(), 1);
    }

    #[test]
    fn unsupported_actions_are_refused() {
        let p = profile(serde_json::json!({"defaultAction": "SCMP_ACT_NOTIFY"}));
        assert!(compile(&p).unwrap_err().to_string().contains("not supported"));
    }
}
