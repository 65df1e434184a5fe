//! The measured-starts benchmark (issue 14 part 2): what `[measurements]` costs a container start,
//! with and without a TPM, next to measurements off, in one node and one run. cri-systemd only.
//!
//! Three daemon configs: off; on, log only (append, fsync, journal); on with swtpm (the same, plus
//! a PCR read at the first start and one PCR extend per start, over swtpm's TCP TCTI in the node).
//! Each round restarts the daemon once per config (the order rotates from round to round) and
//! times `--starts` pods: RunPodSandbox untimed, then CreateContainer + StartContainer timed (the
//! record is written inside StartContainer), then the pod stopped and removed, untimed. One
//! untimed warm-up start after each restart (the first start with a TPM also compares the PCR
//! with the log). swtpm is a process on the same loopback: a hardware TPM is slower (an extend
//! takes milliseconds on a discrete TPM), so the TPM row is a floor, not a forecast.

use std::time::{Duration, Instant};

use crate::lifecycle::{create_start, pod_config, run_pod, stop_remove};
use crate::runtimes::{self, Kind, Runtime};
use crate::table::{Table, ms};
use crate::{BUSYBOX_REPO, Only, REGISTRY_PORT, Setup, call, image_ref, image_spec};
use e2e::cri;

#[derive(Debug, Clone)]
pub struct Options {
    pub starts: usize,
    pub rounds: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { starts: 20, rounds: 3 }
    }
}

/// The configs compared, in table order.
const MODES: [(&str, &str); 3] = [
    ("measurements off", ""),
    ("on, log + journal", "[measurements]\nenabled = true\n"),
    ("on, log + journal + TPM (swtpm)", "[measurements]\nenabled = true\ntpm = true\n"),
];

pub async fn run(options: Options) -> Result<(), String> {
    let load = crate::load_average();
    let setup = Setup::boot("bench-measure", Only::One(Kind::CriSystemd)).await?;
    let _registry = setup.registry();
    e2e::start_swtpm(&setup.node);
    let image = image_ref(&format!("{BUSYBOX_REPO}:1"));
    let mut label = String::new();
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); MODES.len()];
    let mut n = 0;
    for round in 0..options.rounds {
        for k in 0..MODES.len() {
            let mode = (round + k) % MODES.len();
            eprintln!("bench: round {}/{}: {}", round + 1, options.rounds, MODES[mode].0);
            let rt = restart(&setup, MODES[mode].1).await?;
            label = rt.label.clone();
            let mut client = rt.client().await?;
            let request = cri::PullImageRequest { image: image_spec(&image), ..Default::default() };
            call(&rt, "PullImage", Duration::from_secs(120), client.image.pull_image(request)).await?;
            for i in 0..=options.starts {
                n += 1;
                let config = pod_config("measure", n, false);
                let pod = run_pod(&rt, &mut client, &config).await?;
                let begin = Instant::now();
                create_start(&rt, &mut client, &pod, &config, &image).await?;
                let took = begin.elapsed();
                if i > 0 {
                    samples[mode].push(took);
                }
                stop_remove(&rt, &mut client, &pod).await?;
            }
        }
    }
    let records = setup.node.sh("wc -l < /var/lib/cri-systemd/measurements/starts.log");
    let verified = setup.node.exec(&[
        "/usr/local/bin/cri-systemd",
        "measurements",
        "verify",
        "--tcti",
        e2e::SWTPM_TCTI,
        "--log",
        "/var/lib/cri-systemd/measurements/starts.log",
    ]);
    println!("{}", render(&options, &label, &samples, &load).render());
    println!(
        "log after the run: {} records; measurements verify (swtpm): {}",
        records.trim(),
        verified.stdout.lines().last().unwrap_or_default()
    );
    Ok(())
}

/// Writes the daemon's config (the node's registry, plus `extra`) and restarts it.
async fn restart(setup: &Setup, extra: &str) -> Result<Runtime, String> {
    let tpm = format!("tcti = \"{}\"\n", e2e::SWTPM_TCTI);
    let extra = if extra.contains("tpm = true") { format!("{extra}{tpm}") } else { extra.to_owned() };
    setup.node.write_file(
        "/etc/cri-systemd/config.toml",
        &format!("[images.registries.\"127.0.0.1:{REGISTRY_PORT}\"]\nplain_http = true\n{extra}"),
    );
    setup.node.sh("systemctl restart cri-systemd");
    runtimes::cri_systemd(&setup.node, setup.pid1).await
}

fn median(samples: &[Duration]) -> Option<Duration> {
    crate::table::median_f64(&samples.iter().map(Duration::as_secs_f64).collect::<Vec<_>>())
        .map(Duration::from_secs_f64)
}

fn render(options: &Options, label: &str, samples: &[Vec<Duration>], load: &str) -> Table {
    let mut t = Table::new(
        format!(
            "Measured starts ({label}): CreateContainer + StartContainer, median of {} starts ({} rounds of {}), ms",
            options.rounds * options.starts,
            options.rounds,
            options.starts
        ),
        &["", "Create+StartContainer", "p90", "cost per start vs off"],
    );
    let off = median(&samples[0]);
    for (mode, s) in samples.iter().enumerate() {
        let mut sorted = s.clone();
        sorted.sort();
        let p90 = sorted.get(sorted.len() * 9 / 10).copied();
        let cost = match (mode, median(s), off) {
            (0, _, _) => String::new(),
            (_, Some(m), Some(off)) => format!("{:+.2} ms", (m.as_secs_f64() - off.as_secs_f64()) * 1e3),
            _ => "-".into(),
        };
        t.row(vec![MODES[mode].0.into(), median(s).map_or("-".into(), ms), p90.map_or("-".into(), ms), cost]);
    }
    t.note("each record: one JSON line appended and fsync'd (fdatasync), one journal entry over journald's socket; with the TPM also one PCR extend (a new TCTI connection per operation)");
    t.note("swtpm on the node's loopback: a discrete TPM's extend is slower; the TPM row is a floor");
    t.note("cost per start: difference of the medians (the configs run in rotation, each after a daemon restart)");
    t.note(crate::machine_note(load));
    t
}
