//! Logs to stderr. Under systemd (stderr connected to the journal, `JOURNAL_STREAM` set) each line
//! starts with a `<N>` syslog priority prefix, which journald turns into the entry's priority, and
//! carries no timestamp of its own (the journal adds one). Elsewhere: plain timestamped lines.
//! Another layer (the OpenTelemetry exporter's, `otel.rs`) may sit beside it with its own filter.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::LogLevel;

/// A layer beside the log's, with its own filter.
pub type ExtraLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the configured level; it
/// filters the log only, not `extra`.
pub fn init(level: LogLevel, extra: Option<ExtraLayer>) {
    // Dependencies log their internals at debug; keep them quiet unless asked for by RUST_LOG.
    let default_filter =
        format!("{},zbus=warn,h2=warn,hyper=warn,tower=warn,rustls=warn,tss_esapi=warn", level.as_str());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false);
    let log: ExtraLayer = if std::env::var_os("JOURNAL_STREAM").is_some() {
        Box::new(log.event_format(JournalFormat).with_filter(filter))
    } else {
        Box::new(log.with_filter(filter))
    };
    tracing_subscriber::registry().with(std::iter::once(log).chain(extra).collect::<Vec<_>>()).init();
}

/// `<priority>target: message key=value ...`, one line per event.
struct JournalFormat;

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{priority}>{}: ", event.metadata().target())?;
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
