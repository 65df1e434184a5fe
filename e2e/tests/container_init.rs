//! `cri-systemd init <spec.json>` (the `init` crate) driven as the daemon drives it: one transient
//! `Type=notify` unit per container, in a pod slice, in a throwaway systemd node, with a busybox
//! rootfs as the overlay's lower dir. Containers write what they see to a bind-mounted `out/`.

use std::time::{Duration, Instant};

use e2e::{BUSYBOX_APPLETS, Node, NodeOptions, Run, busybox_rootfs};
use serde_json::{Value, json};

const STATE: &str = "/var/lib/cri-systemd/init-tests";
const REPORT_TIMEOUT: Duration = Duration::from_secs(20);

/// The capabilities containerd gives a container by default; 0xa80425fb in /proc/self/status.
const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// One container in the node: `<STATE>/<name>/{upper,work,rootfs,out,spec.json,error}`, over a
/// shared busybox lower dir, started as `cri-<name>.service` in a pod slice.
struct Container<'a> {
    node: &'a Node,
    name: String,
    dir: String,
    spec: Value,
}

fn lower(node: &Node) -> String {
    let dir = format!("{STATE}/busybox");
    if !node.exec(&["test", "-x", &format!("{dir}/bin/busybox")]).success() {
        busybox_rootfs(node, &dir, BUSYBOX_APPLETS);
    }
    dir
}

impl<'a> Container<'a> {
    /// A container like a CRI runtime makes one: containerd's default mounts, masked and
    /// read-only paths, capabilities; new pid, ipc, uts, mount, network and cgroup namespaces.
    fn new(node: &'a Node, name: &str, args: &[&str]) -> Container<'a> {
        let lower = lower(node);
        let dir = format!("{STATE}/{name}");
        node.sh(&format!("mkdir -p {dir}/upper {dir}/work {dir}/rootfs {dir}/out && chmod 777 {dir}/out"));
        let spec = json!({
            "oci": {
                "ociVersion": "1.0.2",
                "process": {
                    "user": { "uid": 0, "gid": 0 },
                    "args": args,
                    "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello"],
                    "cwd": "/",
                    "capabilities": { "bounding": DEFAULT_CAPS, "effective": DEFAULT_CAPS, "permitted": DEFAULT_CAPS },
                    "noNewPrivileges": true
                },
                "root": { "path": format!("{dir}/rootfs") },
                "hostname": format!("{name}-host"),
                "mounts": [
                    { "destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"] },
                    { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
                    { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
                      "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
                    { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"] },
                    { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] },
                    { "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"] },
                    { "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
                    { "destination": "/out", "type": "bind", "source": format!("{dir}/out"), "options": ["rbind", "rprivate"] }
                ],
                "linux": {
                    "namespaces": [{ "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }, { "type": "network" }, { "type": "cgroup" }],
                    "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                                    "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
                    "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
                }
            },
            "rootfs": { "lowerdirs": [lower], "upperdir": format!("{dir}/upper"), "workdir": format!("{dir}/work") },
            "errorFile": format!("{dir}/error")
        });
        Container { node, name: name.to_string(), dir, spec }
    }

    fn unit(&self) -> String {
        format!("cri-{}.service", self.name)
    }

    fn oci(&mut self) -> &mut Value {
        &mut self.spec["oci"]
    }

    fn add_mount(&mut self, mount: Value) {
        self.spec["oci"]["mounts"].as_array_mut().unwrap().push(mount);
    }

    /// Writes the spec and starts the unit as the daemon does; returns systemd-run's outcome.
    fn start(&self, properties: &[&str]) -> Run {
        let spec_path = format!("{}/spec.json", self.dir);
        self.node.write_file(&spec_path, &serde_json::to_string_pretty(&self.spec).unwrap());
        let slice = format!("kubepods-besteffort-pod{}.slice", self.name.replace('-', "_"));
        let mut args = vec![
            "systemd-run".to_string(),
            format!("--unit={}", self.unit()),
            format!("--slice={slice}"),
            "-p".into(),
            "Type=notify".into(),
            "-p".into(),
            "NotifyAccess=all".into(),
        ];
        for p in properties {
            args.push("-p".into());
            args.push(p.to_string());
        }
        args.extend(["/usr/local/bin/cri-systemd".into(), "init".into(), spec_path]);
        self.node.exec(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn start_ok(&self, properties: &[&str]) {
        let run = self.start(properties);
        assert!(
            run.success(),
            "starting {} failed: {}{}\nerror file: {}\n{}",
            self.unit(),
            run.stdout,
            run.stderr,
            self.error(),
            self.journal()
        );
    }

    fn error(&self) -> String {
        self.node.exec(&["cat", &format!("{}/error", self.dir)]).stdout.trim().to_string()
    }

    fn journal(&self) -> String {
        self.node.exec(&["journalctl", "-u", &self.unit(), "--no-pager", "-o", "cat"]).stdout
    }

    fn show(&self, property: &str) -> String {
        self.node.sh(&format!("systemctl show -p {property} --value {}", self.unit())).trim().to_string()
    }

    /// Waits for `<out>/report` to end with an `END` line; returns it.
    fn report(&self) -> String {
        let path = format!("{}/out/report", self.dir);
        let deadline = Instant::now() + REPORT_TIMEOUT;
        loop {
            let text = self.node.exec(&["cat", &path]).stdout;
            if text.lines().any(|l| l == "END") {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no complete report from {} in {REPORT_TIMEOUT:?}: {text:?}\n{}",
                self.unit(),
                self.journal()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `property` of the unit is `value`.
    fn wait_for(&self, property: &str, value: &str) {
        let deadline = Instant::now() + REPORT_TIMEOUT;
        loop {
            let current = self.show(property);
            if current == value {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} {property}={current}, want {value}\n{}",
                self.unit(),
                self.journal()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The PIDs (as the node sees them) in the unit's cgroup.
    fn pids(&self) -> Vec<String> {
        let cgroup = self.show("ControlGroup");
        if cgroup.is_empty() {
            return Vec::new();
        }
        let procs = self.node.exec(&[
            "sh",
            "-c",
            &format!("cat /sys/fs/cgroup/unified{cgroup}/cgroup.procs 2>/dev/null || cat /sys/fs/cgroup{cgroup}/cgroup.procs 2>/dev/null"),
        ]);
        procs.stdout.split_whitespace().map(str::to_string).collect()
    }
}

/// The value of `key=` in a report.
fn field<'r>(report: &'r str, key: &str) -> &'r str {
    let prefix = format!("{key}=");
    report
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key}= in report:\n{report}"))
        .trim()
}

/// The node's own mount points (PID 1's view), sorted.
fn node_mounts(node: &Node) -> Vec<String> {
    let mut mounts: Vec<String> =
        node.sh("cat /proc/1/mountinfo").lines().map(|l| l.split(' ').nth(4).unwrap_or("").to_string()).collect();
    mounts.sort();
    mounts
}

/// Command lines of all processes in the node that are a `cri-systemd init`.
fn init_processes(node: &Node) -> String {
    node.exec(&["sh", "-c", "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep '^/usr/local/bin/cri-systemd init' || true"])
        .stdout
}

fn up(label: &str) -> Node {
    Node::up(label, NodeOptions { no_daemon: true, ..Default::default() })
}

const SEE_SCRIPT: &str = r#"{
echo pid=$$
echo hostname=$(hostname)
echo root=$(ls /)
echo id=$(id)
grep -E '^(Cap[A-Za-z]+|NoNewPrivs|Groups):' /proc/self/status | sed 's/:[[:space:]]*/=/'
echo dev=$(ls /dev)
echo data=$(cat /data/file)
touch /data/new 2>/dev/null && echo data_writable=yes || echo data_writable=no
echo hosts=$(cat /etc/hosts)
echo keys=$(cat /proc/keys | wc -c)
echo firmware=$(ls /sys/firmware | wc -l)
(echo 1 > /proc/sys/kernel/ns_last_pid) 2>/dev/null && echo procsys_writable=yes || echo procsys_writable=no
echo cgroup=$(ls /sys/fs/cgroup | wc -l)
echo greeting=$GREETING
echo home=$HOME
echo shm_rmid_forced=$(cat /proc/sys/kernel/shm_rmid_forced)
echo port_start=$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start)
echo domainname=$(cat /proc/sys/kernel/domainname)
echo END
} > /out/report 2>&1
exec sleep 1000"#;

#[test]
fn container_runs_as_the_units_main_process() {
    let node = up("init-main");
    let before = node_mounts(&node);
    let mut c = Container::new(&node, "main", &["sh", "-c", SEE_SCRIPT]);
    // A read-only bind of a host dir, and /etc/hosts bound from a host file given as a symlink.
    let dir = c.dir.clone();
    node.sh(&format!(
        "mkdir -p {dir}/vol && echo hello > {dir}/vol/file && echo '127.0.0.1 localhost' > {dir}/hosts && ln -sfn {dir}/hosts {dir}/hosts-link"
    ));
    c.add_mount(
        json!({ "destination": "/data", "type": "bind", "source": format!("{dir}/vol"), "options": ["rbind", "ro"] }),
    );
    c.add_mount(json!({ "destination": "/etc/hosts", "type": "bind", "source": format!("{dir}/hosts-link"), "options": ["bind", "ro"] }));
    c.oci()["linux"]["sysctl"] = json!({ "kernel.shm_rmid_forced": "1", "net.ipv4.ip_unprivileged_port_start": "80" });
    c.oci()["domainname"] = json!("example.test");
    c.start_ok(&[]);
    let report = c.report();

    assert_eq!(field(&report, "pid"), "1", "{report}");
    assert_eq!(field(&report, "hostname"), "main-host");
    assert_eq!(field(&report, "shm_rmid_forced"), "1");
    assert_eq!(field(&report, "port_start"), "80");
    assert_eq!(field(&report, "domainname"), "example.test");
    assert_eq!(field(&report, "root"), "bin data dev etc out proc root sys tmp");
    assert!(field(&report, "id").starts_with("uid=0(root) gid=0(root)"), "{report}");
    assert_eq!(field(&report, "CapEff"), "00000000a80425fb", "{report}");
    assert_eq!(field(&report, "CapPrm"), "00000000a80425fb");
    assert_eq!(field(&report, "CapBnd"), "00000000a80425fb");
    assert_eq!(field(&report, "CapInh"), "0000000000000000");
    assert_eq!(field(&report, "CapAmb"), "0000000000000000");
    assert_eq!(field(&report, "NoNewPrivs"), "1");
    assert_eq!(field(&report, "dev"), "fd full mqueue null ptmx pts random shm stderr stdin stdout tty urandom zero");
    assert_eq!(field(&report, "data"), "hello");
    assert_eq!(field(&report, "data_writable"), "no");
    assert_eq!(field(&report, "hosts"), "127.0.0.1 localhost");
    assert_eq!(field(&report, "keys"), "0", "masked /proc/keys");
    assert_eq!(field(&report, "firmware"), "0", "masked /sys/firmware");
    assert_eq!(field(&report, "procsys_writable"), "no");
    assert_ne!(field(&report, "cgroup"), "0", "cgroup file system mounted");
    assert_eq!(field(&report, "greeting"), "hello");
    assert_eq!(field(&report, "home"), "/root", "HOME from the image's /etc/passwd");

    // systemd's main PID is the entrypoint itself; nothing of init remains.
    let main_pid = c.show("MainPID");
    let cmdline = node.sh(&format!("tr '\\0' ' ' < /proc/{main_pid}/cmdline"));
    assert_eq!(cmdline.trim(), "sleep 1000");
    assert_eq!(c.pids(), vec![main_pid.clone()], "only the entrypoint in the unit's cgroup");
    assert_eq!(init_processes(&node), "", "an init process stayed");
    assert_eq!(c.show("ActiveState"), "active");
    assert!(
        c.show("ControlGroup").starts_with("/kubepods.slice/kubepods-besteffort.slice/"),
        "{}",
        c.show("ControlGroup")
    );
    // Its own PID namespace; the node's mount table untouched; the rootfs mounted only inside.
    assert_ne!(node.sh(&format!("readlink /proc/{main_pid}/ns/pid")), node.sh("readlink /proc/1/ns/pid"));
    assert_eq!(node_mounts(&node), before, "the node's mount table changed");
    assert_eq!(node.sh(&format!("ls -A {dir}/rootfs")), "", "rootfs mounted in the node's namespace");
    assert_eq!(c.error(), "");

    // Killed, it takes its mounts with it; the node's table never saw them.
    node.sh(&format!("systemctl kill -s KILL {}", c.unit()));
    c.wait_for("ActiveState", "failed");
    assert_eq!(c.show("ExecMainStatus"), "9");
    assert_eq!(c.show("ExecMainPID"), main_pid);
    assert_eq!(node_mounts(&node), before);
}

#[test]
fn exit_status_is_the_entrypoints() {
    let node = up("init-exit");
    // Exits at once: the race between exec and MAINPID= must not lose the status.
    let c = Container::new(&node, "three", &["sh", "-c", "exit 3"]);
    c.start_ok(&[]);
    c.wait_for("ActiveState", "failed");
    assert_eq!(c.show("Result"), "exit-code");
    assert_eq!(c.show("ExecMainCode"), "1", "CLD_EXITED");
    assert_eq!(c.show("ExecMainStatus"), "3");

    let c = Container::new(&node, "zero", &["true"]);
    c.start_ok(&["RemainAfterExit=yes"]);
    c.wait_for("SubState", "exited");
    assert_eq!(c.show("Result"), "success");
    assert_eq!(c.show("ExecMainCode"), "1");
    assert_eq!(c.show("ExecMainStatus"), "0");

    // Exits later, long after init is gone: systemd reaps the orphan it adopted.
    let c = Container::new(&node, "later", &["sh", "-c", "sleep 1; exit 7"]);
    c.start_ok(&[]);
    assert_eq!(init_processes(&node), "");
    c.wait_for("ActiveState", "failed");
    assert_eq!(c.show("ExecMainCode"), "1");
    assert_eq!(c.show("ExecMainStatus"), "7");
}

#[test]
fn start_failures_are_reported_in_the_error_file() {
    let node = up("init-fail");
    let before = node_mounts(&node);

    let check = |c: &Container, want: &str| {
        let run = c.start(&[]);
        assert!(!run.success(), "{} started: {}{}", c.unit(), run.stdout, run.stderr);
        assert_eq!(c.error(), want, "{}", c.journal());
        assert_eq!(c.show("ActiveState"), "failed");
        assert!(c.pids().is_empty(), "processes left in {}: {:?}", c.unit(), c.pids());
    };

    check(&Container::new(&node, "nosuch", &["nosuch"]), r#"exec: "nosuch": executable file not found in $PATH"#);
    check(&Container::new(&node, "notexec", &["/etc/passwd"]), r#"exec: "/etc/passwd": permission denied"#);
    check(
        &Container::new(&node, "nofile", &["/no/such/file"]),
        r#"exec: "/no/such/file": stat /no/such/file: no such file or directory"#,
    );

    // Found and executable, but execve fails: reported after systemd was given the child's PID.
    let c = Container::new(&node, "noexec", &["/garbage"]);
    node.sh(&format!("echo garbage > {0}/upper/garbage && chmod 755 {0}/upper/garbage", c.dir));
    check(&c, "exec /garbage: exec format error");

    let mut c = Container::new(&node, "cwdfile", &["true"]);
    c.oci()["process"]["cwd"] = json!("/etc/passwd");
    check(&c, r#"chdir to cwd ("/etc/passwd") set in config.json failed: not a directory"#);

    // A missing cwd is created, as runc does (even with a read-only root: before the remount);
    // one that cannot be created fails.
    let mut c = Container::new(&node, "cwdproc", &["true"]);
    c.oci()["process"]["cwd"] = json!("/proc/nope");
    check(&c, r#"chdir to cwd ("/proc/nope") set in config.json failed: no such file or directory"#);

    let mut c = Container::new(&node, "nosource", &["true"]);
    c.add_mount(json!({ "destination": "/x", "type": "bind", "source": "/no/such/dir", "options": ["rbind"] }));
    check(&c, "bind mount source /no/such/dir for /x: no such file or directory");

    let mut c = Container::new(&node, "seccomp", &["true"]);
    // Profiles are compiled before anything is set up; an action init cannot apply fails the start.
    c.oci()["linux"]["seccomp"] = json!({ "defaultAction": "SCMP_ACT_NOTIFY" });
    check(&c, "seccomp action SCMP_ACT_NOTIFY is not supported");

    // Idmapped lower dirs (as the daemon gives them with its default layer_uid_shift), staged in
    // the container's mount namespace, and a work dir on another file system than the upper dir:
    // overlayfs refuses, and the error names the rootfs (not the staging) and what the kernel
    // said, which for this is only EINVAL (the reason goes to the kernel log).
    let mut c = Container::new(&node, "idmapwork", &["true"]);
    let identity = json!([{ "containerID": 0, "hostID": 0, "size": 65536 }]);
    c.spec["rootfs"]["uidMappings"] = identity.clone();
    c.spec["rootfs"]["gidMappings"] = identity;
    node.sh("mkdir -p /run/idmapwork-work");
    c.spec["rootfs"]["workdir"] = json!("/run/idmapwork-work");
    let run = c.start(&[]);
    assert!(!run.success(), "{} started", c.unit());
    let error = c.error();
    assert!(error.starts_with(&format!("mount overlay rootfs on {}/rootfs: invalid argument (", c.dir)), "{error}");
    assert!(c.pids().is_empty(), "processes left in {}: {:?}", c.unit(), c.pids());

    // A stale error file goes away on the next successful start.
    let c = Container::new(&node, "nosuch", &["sleep", "1000"]);
    node.sh(&format!("systemctl reset-failed {}", c.unit()));
    c.start_ok(&[]);
    assert_eq!(c.error(), "");

    assert_eq!(init_processes(&node), "");
    assert_eq!(node_mounts(&node), before, "a failed start left mounts in the node");
}

#[test]
fn user_capabilities_rlimits_and_read_only_root() {
    let node = up("init-user");
    let script = r#"{
echo id=$(id -u):$(id -g)
grep -E '^(Cap[A-Za-z]+|NoNewPrivs|Groups):' /proc/self/status | sed 's/:[[:space:]]*/=/'
echo nofile=$(ulimit -n)
echo cwd=$(pwd)
echo home=$HOME
touch /rootfile 2>/dev/null && echo root_writable=yes || echo root_writable=no
echo umask=$(umask)
echo END
} > /out/report 2>&1"#;
    let mut c = Container::new(&node, "user", &["sh", "-c", script]);
    let cap = json!(["CAP_NET_BIND_SERVICE"]);
    c.oci()["process"]["user"] = json!({ "uid": 1000, "gid": 1000, "additionalGids": [10, 20], "umask": 0o027 });
    c.oci()["process"]["capabilities"] =
        json!({ "bounding": cap, "effective": cap, "permitted": cap, "inheritable": cap, "ambient": cap });
    c.oci()["process"]["rlimits"] = json!([{ "type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096 }]);
    c.oci()["process"]["cwd"] = json!("/home/user");
    c.oci()["root"]["readonly"] = json!(true);
    c.start_ok(&["RemainAfterExit=yes"]);
    let report = c.report();
    assert_eq!(field(&report, "id"), "1000:1000", "{report}");
    assert_eq!(field(&report, "Groups"), "10 20");
    for set in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
        assert_eq!(field(&report, set), "0000000000000400", "{set} in {report}");
    }
    assert_eq!(field(&report, "NoNewPrivs"), "1");
    assert_eq!(field(&report, "nofile"), "4096");
    assert_eq!(field(&report, "cwd"), "/home/user", "created cwd");
    assert_eq!(field(&report, "home"), "/home/user");
    assert_eq!(field(&report, "root_writable"), "no");
    assert_eq!(field(&report, "umask"), "0027");
    c.wait_for("SubState", "exited");
    assert_eq!(c.show("ExecMainStatus"), "0");
}

#[test]
fn joined_namespaces_many_layers_propagation_and_symlinks() {
    let node = up("init-ns");
    // Pinned namespaces, as the daemon keeps them for a pod.
    node.sh("mkdir -p /run/pins && touch /run/pins/net /run/pins/uts && unshare --net=/run/pins/net --uts=/run/pins/uts hostname podhost");
    let script = r#"{
echo pid=$$
echo hostname=$(hostname)
echo which=$(cat /which)
echo bottom=$(cat /layer-149)
echo escape=$(cat /tmp/escape-target/sub/file)
i=0; while [ ! -e /prop/sub/marker ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo propagated=$(cat /prop/sub/marker)
echo END
} > /out/report 2>&1
exec sleep 1000"#;
    let mut c = Container::new(&node, "ns", &["sh", "-c", script]);
    let dir = c.dir.clone();
    c.oci()["linux"]["namespaces"] = json!([
        { "type": "pid" }, { "type": "ipc" }, { "type": "mount" }, { "type": "cgroup" },
        { "type": "network", "path": "/run/pins/net" }, { "type": "uts", "path": "/run/pins/uts" }
    ]);
    c.oci()["hostname"] = Value::Null;

    // 150 layers with long paths: the options exceed a page, so init takes the new mount API.
    // Layer i holds /layer-i and /which = i; the top layer (0) wins. Layer 0 also has a symlink
    // pointing out of the rootfs, used as a mount destination below.
    let long = "x".repeat(60);
    node.sh(&format!(
        "for i in $(seq 0 149); do d={dir}/layers/{long}-$i; mkdir -p $d && echo $i > $d/which && echo $i > $d/layer-$i; done && \
         mkdir -p {dir}/layers/{long}-0/tmp && ln -s /../../../../../tmp/escape-target {dir}/layers/{long}-0/escape && \
         mkdir -p {dir}/src {dir}/prop && echo inside > {dir}/src/file && rm -rf /tmp/escape-target"
    ));
    let mut lowers: Vec<String> = (0..150).map(|i| format!("{dir}/layers/{long}-{i}")).collect();
    lowers.push(format!("{STATE}/busybox"));
    assert!(lowers.join(":").len() > 4096);
    c.spec["rootfs"]["lowerdirs"] = json!(lowers);
    c.add_mount(json!({ "destination": "/escape/sub", "type": "bind", "source": format!("{dir}/src"), "options": ["rbind", "ro"] }));
    c.add_mount(json!({ "destination": "/prop", "type": "bind", "source": format!("{dir}/prop"), "options": ["rbind", "rslave"] }));
    c.start_ok(&[]);

    // A mount made on the node after the start reaches the container (rslave).
    node.sh(&format!(
        "mkdir -p {dir}/prop/sub && mount -t tmpfs tmpfs {dir}/prop/sub && echo yes > {dir}/prop/sub/marker"
    ));
    let report = c.report();
    node.sh(&format!("umount {dir}/prop/sub"));
    assert_eq!(field(&report, "pid"), "1", "{report}");
    assert_eq!(field(&report, "hostname"), "podhost", "the joined UTS namespace");
    assert_eq!(field(&report, "which"), "0", "the top layer wins");
    assert_eq!(field(&report, "bottom"), "149");
    assert_eq!(field(&report, "escape"), "inside", "the symlinked destination resolved inside the rootfs");
    assert_eq!(field(&report, "propagated"), "yes");
    assert!(!node.exec(&["test", "-e", "/tmp/escape-target"]).success(), "a mount destination escaped the rootfs");
    let main_pid = c.show("MainPID");
    let pinned = node.sh("stat -L -c %i /run/pins/net").trim().to_string();
    assert_eq!(node.sh(&format!("readlink /proc/{main_pid}/ns/net")).trim(), format!("net:[{pinned}]"));

    // No PID namespace in the spec (hostPID): the entrypoint is a node process, still the main PID.
    let script = r#"{ echo pid=$$; echo END; } > /out/report; exec sleep 1000"#;
    let mut c = Container::new(&node, "hostpid", &["sh", "-c", script]);
    c.oci()["linux"]["namespaces"] = json!([{ "type": "mount" }, { "type": "uts" }]);
    c.start_ok(&[]);
    let report = c.report();
    assert_eq!(field(&report, "pid"), c.show("MainPID"));
    assert_eq!(node.sh(&format!("readlink /proc/{}/ns/pid", c.show("MainPID"))), node.sh("readlink /proc/1/ns/pid"));
    assert_eq!(init_processes(&node), "");
}

#[test]
fn bidirectional_mounts_propagate_back_with_rshared_rootfs_propagation() {
    let node = up("init-shared");
    let before = node_mounts(&node);
    // A CRI "Bidirectional" mount: the runtime sets rootfsPropagation=rshared (as containerd does)
    // and the bind is rshared; what the container mounts under it appears on the node.
    let script = r#"mount -t tmpfs -o size=1m tmpfs /shared/sub && echo fromcontainer > /shared/sub/file && { echo END; } > /out/report; exec sleep 1000"#;
    let mut c = Container::new(&node, "shared", &["sh", "-c", script]);
    let dir = c.dir.clone();
    node.sh(&format!("mkdir -p {dir}/shared/sub"));
    let caps = json!(["CAP_SYS_ADMIN"]);
    c.oci()["process"]["capabilities"] = json!({ "bounding": caps, "effective": caps, "permitted": caps });
    c.oci()["linux"]["rootfsPropagation"] = json!("rshared");
    c.add_mount(json!({ "destination": "/shared", "type": "bind", "source": format!("{dir}/shared"), "options": ["rbind", "rshared"] }));
    c.start_ok(&[]);
    c.report();
    assert_eq!(node.sh(&format!("cat {dir}/shared/sub/file")).trim(), "fromcontainer");
    // Only that mount reached the node: not the rootfs, /proc, /dev... of the container.
    let mut after = node_mounts(&node);
    let propagated = format!("{dir}/shared/sub");
    assert!(after.contains(&propagated), "{after:?}");
    after.retain(|m| *m != propagated);
    assert_eq!(after, before);
    node.sh(&format!("umount {propagated}"));
}
