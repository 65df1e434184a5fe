# shellcheck shell=bash
# The script of the cgroup v2 smoke test (e2e/tests/cgroup_v2.rs), run as root inside the VM of
# e2e/vm (systemd on the unified hierarchy). The test prepends REPO, DAEMON, CRI and PUSH (the
# binaries cri-systemd, cri and push), LAYOUT and DEEP_LAYOUT (the busybox image and a 128-layer
# image as OCI layouts) and WORK (a directory with the pod.json, busy.json, hog.json,
# userns-pod.json and uns.json it wrote), and asserts on what this prints: sections "@@ NAME" each
# followed by its text. The script only stops early when going on makes no sense (section "error",
# then the daemon's journal).
set -uo pipefail
: "${REPO:?}" "${DEPLOY:?}" "${DAEMON:?}" "${CRI:?}" "${PUSH:?}" "${LAYOUT:?}" "${DEEP_LAYOUT:?}" "${WORK:?}"

emit() {
	printf '@@ %s\n' "$1"
	shift
	if (($#)); then printf '%s\n' "$*"; else cat; fi
}
die() {
	emit error "$*"
	journalctl -u cri-systemd.service --no-pager -o short-monotonic -n 150 | emit journal
	exit 1
}
mark() { emit "time.$1" "$(cut -d' ' -f1 /proc/uptime)"; }
cri() { "$CRI" "$@"; }
# The first "KEY": "VALUE" of the JSON on stdin.
json_string() { sed -n "s/^ *\"$1\": \"\([^\"]*\)\".*/\1/p" | head -n 1; }
# Waits up to $2 seconds for the container $1 to be CONTAINER_EXITED (state 2).
# (By the clock: under TCG one `cri inspect` can take a second or more.)
wait_exited() {
	local until=$((SECONDS + $2))
	while ((SECONDS < until)); do
		cri inspect "$1" | grep -q '^    "state": 2,' && return 0
		sleep 0.2
	done
	return 1
}
cgroup_state() { if [[ -d /sys/fs/cgroup$1 ]]; then echo present; else echo gone; fi; }

mark start
emit kernel "$(uname -r)"
# --- Really the unified hierarchy ------------------------------------------------------------
emit cgroup.fstype "$(stat -f -c %T /sys/fs/cgroup)"
emit cgroup.controllers "$(cat /sys/fs/cgroup/cgroup.controllers 2>&1)"
emit cgroup.v1_mounts "$(awk '/ - cgroup / { n++ } END { print n + 0 }' /proc/self/mountinfo)"

# --- cri-systemd as deploy/cri-systemd.service ------------------------------------------------
# Bind-mounted rather than copied: 250 MB of debug binary through 9p take seconds under TCG.
install -D -m 0755 /dev/null /usr/local/bin/cri-systemd
mount --bind "$DAEMON" /usr/local/bin/cri-systemd || die "cannot install the daemon"
install -D -m 0644 "$DEPLOY/cri-systemd.service" /etc/systemd/system/cri-systemd.service
mkdir -p /etc/cri-systemd
# deploy/config.toml as it is (layers in the foreign UID range, seen through idmapped mounts),
# plus the registry in the VM.
{
	cat "$DEPLOY/config.toml"
	printf '\n[images.registries."127.0.0.1:5000"]\nplain_http = true\n'
} >/etc/cri-systemd/config.toml
systemctl daemon-reload
systemctl start cri-systemd.service || die "cri-systemd.service did not start"
emit daemon.active "$(systemctl is-active cri-systemd.service)"
emit daemon.cgroup "$(systemctl show -P ControlGroup cri-systemd.service)"
out=$(cri status) || die "Status: $out"
emit status "$out"
# The preflight on a cgroup v2 node, as an operator runs it (the table; its exit status last).
emit check "$(cri-systemd check 2>&1; echo "exit $?")"
mark daemon

# --- A registry with the busybox image ---------------------------------------------------------
mkdir -p /srv/registry
cat >/srv/registry/config.yml <<'EOF'
version: 0.1
log:
  level: warn
  formatter: text
storage:
  filesystem:
    rootdirectory: /srv/registry/data
http:
  addr: 127.0.0.1:5000
  secret: cri-systemd-v2-not-secret
EOF
systemd-run --quiet --unit=e2e-registry -p Type=exec /usr/bin/docker-registry serve /srv/registry/config.yml ||
	die "cannot start docker-registry"
image=$("$PUSH" 127.0.0.1:5000 busybox:v2 "$LAYOUT") || die "push to the registry failed"
emit pushed "$image"
out=$(cri pull "$image") || die "PullImage: $out"
emit pull "$out"
mark pull

# --- A pod, and a container with limits that burns CPU and holds 8 MiB -------------------------
out=$(cri runp "$WORK/pod.json") || die "RunPodSandbox: $out"
pod=$(json_string pod_sandbox_id <<<"$out")
emit pod "$pod"
out=$(cri create "$pod" "$WORK/busy.json") || die "CreateContainer busy: $out"
busy=$(json_string container_id <<<"$out")
out=$(cri start "$busy") || die "StartContainer busy: $out"
unit=cri-$busy.service
cg=$(systemctl show -P ControlGroup "$unit")
[[ -n $cg ]] || die "no ControlGroup for $unit"
emit busy.id "$busy"
emit busy.unit.cgroup "$cg"
emit busy.unit.slice "$(systemctl show -P Slice "$unit")"
emit pod.slice.cgroup "$(systemctl show -P ControlGroup "$(systemctl show -P Slice "$unit")")"
for f in cgroup.controllers memory.max memory.swap.max memory.high memory.min memory.low memory.oom.group cpu.max cpu.weight pids.max hugetlb.2MB.max hugetlb.2MB.rsvd.max; do
	emit "busy.$f" "$(cat "/sys/fs/cgroup$cg/$f" 2>&1)"
done
# Wait until it holds its 8 MiB (the cgroup's own count), then sample twice, a second apart (the
# second sample has a CPU rate).
for ((i = 0; i < 150; i++)); do
	current=$(cat "/sys/fs/cgroup$cg/memory.current" 2>/dev/null) || current=0
	((current > 8 << 20)) && break
	sleep 0.2
done
emit busy.memory.current "$current"
out=$(cri stats "$busy") || die "ContainerStats: $out"
emit busy.stats1 "$out"
sleep 1
out=$(cri stats "$busy") || die "ContainerStats: $out"
emit busy.stats2 "$out"
emit busy.cpu.stat "$(cat "/sys/fs/cgroup$cg/cpu.stat")"
emit busy.memory.stat "$(grep -E '^(anon|file|inactive_file) ' "/sys/fs/cgroup$cg/memory.stat")"
out=$(cri statsp "$pod") || die "PodSandboxStats: $out"
emit pod.stats "$out"
out=$(cri metrics) || die "ListPodSandboxMetrics: $out"
emit metrics "$out"
mark stats

# AppArmor (Debian's kernel has it on): a container that asks for nothing runs under the
# runtime's default profile, and so do the commands exec'd in it.
emit apparmor.enabled "$(cat /sys/module/apparmor/parameters/enabled 2>&1)"
emit busy.apparmor "$(cat "/proc/$(systemctl show -P MainPID "$unit")/attr/current" 2>&1)"
out=$(cri exec --timeout 30 "$busy" sh -c 'cat /proc/self/attr/current') ||
	die "ExecSync apparmor: $out"
emit busy.exec.apparmor "$out"

# ExecSync: output, exit code, and the exec'd process in the container's cgroup.
out=$(cri exec --timeout 30 "$busy" sh -c 'busybox cat /proc/self/cgroup; echo to-stderr >&2; exit 7') ||
	die "ExecSync: $out"
emit busy.exec "$out"
mark exec
emit busy.inspect "$(cri inspect "$busy")"
emit ps "$(cri ps)"

# Stop and remove: no unit, no cgroup left.
out=$(cri stop "$busy" 10) || die "StopContainer: $out"
emit busy.stopped "$(cri inspect "$busy")"
emit busy.cgroup.after_stop "$(cgroup_state "$cg")"
out=$(cri rm "$busy") || die "RemoveContainer: $out"
emit busy.unit.after_rm "$(systemctl show -P LoadState "$unit")"
emit busy.cgroup.after_rm "$(cgroup_state "$cg")"
mark stop

# --- OOM: a 32 MiB limit and a shell that doubles a string until the kernel kills it -----------
out=$(cri create "$pod" "$WORK/hog.json") || die "CreateContainer hog: $out"
hog=$(json_string container_id <<<"$out")
out=$(cri start "$hog") || die "StartContainer hog: $out"
emit hog.id "$hog"
started=$SECONDS
wait_exited "$hog" 60 || emit hog.timeout "not exited after 60 s"
emit hog.exit_seconds "$((SECONDS - started))"
# What systemd did, when the exit took long (CI once saw no exit record for over 60 s).
if ((SECONDS - started > 15)); then
	emit hog.unit "$(systemctl show "cri-$hog.service" -p LoadState,ActiveState,SubState,Result,MainPID,ExecMainCode,ExecMainStatus 2>&1)"
	emit hog.unit_journal "$(journalctl --no-pager -o short-monotonic | grep -F "$hog" | tail -n 40)"
fi
emit hog.inspect "$(cri inspect "$hog")"
emit hog.exit_record "$(cat "/var/lib/cri-systemd/containers/$hog/exit.json" 2>&1)"
emit hog.kernel "$(dmesg | grep -E 'oom-kill|Memory cgroup out of memory' | tail -n 4)"
out=$(cri rm "$hog") || die "RemoveContainer hog: $out"
emit hog.unit.after_rm "$(systemctl show -P LoadState "cri-$hog.service")"
mark oom

# --- A pod in a user namespace: layers stored in the foreign range, idmapped to the pod's ---------
# On this kernel (before 6.8) overlayfs takes idmapped lowers only once they are attached. The
# image has 128 layers: their options must fit mount(2)'s page (lowerdir+ is 6.8's).
emit layer.owner "$(stat -c %u:%g /var/lib/cri-systemd/images/layers/sha256/*/diff/bin/busybox | sort -u)"
image=$("$PUSH" 127.0.0.1:5000 deep:v2 "$DEEP_LAYOUT") || die "push of the 128-layer image failed"
out=$(cri pull "$image") || die "PullImage deep: $out"
emit deep.pull "$out"
out=$(cri runp "$WORK/userns-pod.json") || die "RunPodSandbox userns: $out"
upod=$(json_string pod_sandbox_id <<<"$out")
out=$(cri create "$upod" "$WORK/uns.json") || die "CreateContainer uns: $out"
uns=$(json_string container_id <<<"$out")
out=$(cri start "$uns") || die "StartContainer uns: $out"
emit uns.id "$uns"
upper=/var/lib/cri-systemd/containers/$uns/upper
for ((i = 0; i < 50; i++)); do
	[[ -e $upper/main-wrote ]] && break
	sleep 0.2
done
pid=$(systemctl show -P MainPID "cri-$uns.service")
emit uns.host_uid "$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status" 2>&1)"
emit uns.uid_map "$(cat "/proc/$pid/uid_map" 2>&1)"
emit uns.mountinfo "$(cat "/proc/$pid/mountinfo" 2>&1)"
out=$(cri exec --timeout 30 "$uns" sh -c 'busybox stat -c "%u:%g %n" / /bin /bin/busybox /etc/passwd; busybox id -u;
	busybox cat /main-wrote; echo by-exec >/etc/exec-wrote && busybox stat -c "%u:%g %n" /etc/exec-wrote /main-wrote;
	busybox cat /top; busybox ls /layers | busybox wc -l') ||
	die "ExecSync uns: $out"
emit uns.exec "$out"
emit uns.upper "$(cd "$upper" && stat -c '%u:%g %n' main-wrote etc/exec-wrote 2>&1)"
mark userns

# --- The pods go, with everything they had ------------------------------------------------------
for p in "$pod" "$upod"; do
	out=$(cri stopp "$p") || die "StopPodSandbox $p: $out"
	out=$(cri rmp "$p") || die "RemovePodSandbox $p: $out"
done
emit pods "$(cri pods)"
emit containers "$(cri ps)"
emit leftover.units "$(systemctl list-units --all --plain --no-legend 'cri-[0-9a-f]*.service' 'kubepods-*pod*')"
emit leftover.cgroups "$(find /sys/fs/cgroup -type d \( -name 'cri-[0-9a-f]*.service' -o -name 'kubepods-*pod*' \))"
emit leftover.containers "$(ls /var/lib/cri-systemd/containers 2>/dev/null)"
emit leftover.pods "$(ls /var/lib/cri-systemd/pods 2>/dev/null)"
emit daemon.errors "$(journalctl -u cri-systemd.service --no-pager -o cat -p warning)"
mark end
emit 'done' ok
