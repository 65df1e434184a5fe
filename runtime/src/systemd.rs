//! The connection to systemd's manager (`org.freedesktop.systemd1`) over the system bus.
//!
//! Only the system bus is used: systemd's private socket (`/run/systemd/private`) sends messages
//! whose sender name zbus rejects (zbus issue #1497), so it cannot serve as a fallback.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Mutex;
use tracing::debug;
use zbus::Connection;
use zbus::zvariant::{OwnedObjectPath, Value};

use crate::Error;

/// How long to wait for the bus before calling systemd unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub(crate) trait Manager {
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, zbus::zvariant::Value<'_>)],
        aux: &[(&str, &[(&str, zbus::zvariant::Value<'_>)])],
    ) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> zbus::Result<()>;
    fn set_unit_properties(
        &self,
        name: &str,
        runtime: bool,
        properties: &[(&str, zbus::zvariant::Value<'_>)],
    ) -> zbus::Result<()>;
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn subscribe(&self) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_removed(&self, id: u32, job: OwnedObjectPath, unit: String, result: String) -> zbus::Result<()>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn features(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn virtualization(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn system_state(&self) -> zbus::Result<String>;
}

/// What systemd says about itself; logged at start and checked by the CRI `Status` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerInfo {
    pub version: String,
    pub features: String,
    pub virtualization: String,
    pub system_state: String,
}

/// A lazily (re)connected handle on systemd. Cheap to share behind an `Arc`.
///
/// The bus may come and go (dbus restarted, not yet started at boot): every call connects if
/// there is no live connection, and a failed call drops the connection so that the next one
/// reconnects instead of reusing a dead socket.
#[derive(Debug)]
pub struct Systemd {
    bus_address: String,
    connection: Mutex<Option<Connection>>,
}

impl Systemd {
    /// A handle on the bus at `bus_address` (a D-Bus address such as
    /// `unix:path=/run/dbus/system_bus_socket`). Does not connect yet.
    pub fn new(bus_address: impl Into<String>) -> Self {
        Self { bus_address: bus_address.into(), connection: Mutex::new(None) }
    }

    pub fn bus_address(&self) -> &str {
        &self.bus_address
    }

    async fn connection(&self) -> Result<Connection, Error> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let unreachable = |reason: String| Error::SystemdUnreachable { address: self.bus_address.clone(), reason };
        let builder =
            zbus::connection::Builder::address(self.bus_address.as_str()).map_err(|e| unreachable(e.to_string()))?;
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, builder.build())
            .await
            .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        debug!(address = %self.bus_address, "connected to the system bus");
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Forgets the connection after a failed call, so that the next call reconnects.
    async fn forget_connection(&self) {
        self.connection.lock().await.take();
    }

    /// Runs `call` on the manager proxy; on failure drops the connection and reports systemd
    /// as unreachable with the underlying reason.
    async fn with_manager<T, F, Fut>(&self, call: F) -> Result<T, Error>
    where
        F: FnOnce(ManagerProxy<'static>) -> Fut,
        Fut: std::future::Future<Output = zbus::Result<T>>,
    {
        let connection = self.connection().await?;
        let result = async {
            let manager = ManagerProxy::builder(&connection)
                // Properties such as SystemState change; never serve a stale cached value.
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await?;
            call(manager).await
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, result).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                self.forget_connection().await;
                Err(Error::SystemdUnreachable { address: self.bus_address.clone(), reason: e.to_string() })
            }
            Err(_) => {
                self.forget_connection().await;
                Err(Error::SystemdUnreachable {
                    address: self.bus_address.clone(),
                    reason: format!("systemd did not answer within {CONNECT_TIMEOUT:?}"),
                })
            }
        }
    }

    /// Reads the manager's version, compile-time features, virtualization and state.
    pub async fn manager_info(&self) -> Result<ManagerInfo, Error> {
        self.with_manager(|manager| async move {
            Ok(ManagerInfo {
                version: manager.version().await?,
                features: manager.features().await?,
                virtualization: manager.virtualization().await?,
                system_state: manager.system_state().await?,
            })
        })
        .await
    }
}

/// The unit property values the runtime sets: `(name, value)` pairs as StartTransientUnit takes them.
pub type UnitProperties = Vec<(&'static str, Value<'static>)>;

/// The unit-manager calls the runtime makes: [`Systemd`] over D-Bus in the daemon, an in-memory
/// fake in unit tests (the roll-back and roll-forward of pods and containers, without systemd).
/// The semantics are systemd's, as [`Systemd`]'s methods document them: stopping, killing,
/// changing or resetting a unit that does not exist succeeds.
#[async_trait::async_trait]
pub trait UnitManager: std::fmt::Debug + Send + Sync {
    /// The manager's version, features, virtualization and state (CRI `Status`).
    async fn manager_info(&self) -> Result<ManagerInfo, Error>;
    /// Starts a transient unit and waits for its start job.
    async fn start_transient_unit(&self, name: &str, properties: UnitProperties) -> Result<(), Error>;
    /// As `start_transient_unit`; false, and nothing done, when the unit is loaded already.
    async fn start_transient_unit_unless_loaded(&self, name: &str, properties: UnitProperties) -> Result<bool, Error>;
    /// Stops a unit (a slice: with its units) and waits for the stop job.
    async fn stop_unit(&self, name: &str) -> Result<(), Error>;
    /// Signals the unit's processes (`whom`: "main" or "all").
    async fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> Result<(), Error>;
    /// Changes properties of a loaded unit until it is unloaded.
    async fn set_unit_properties(&self, name: &str, properties: UnitProperties) -> Result<(), Error>;
    /// Forgets a failed unit's state.
    async fn reset_failed_unit(&self, name: &str) -> Result<(), Error>;
    /// Whether the unit is loaded.
    async fn unit_exists(&self, name: &str) -> Result<bool, Error>;
    /// The service's main PID; 0 when it has none.
    async fn main_pid(&self, name: &str) -> Result<u32, Error>;
    /// The unit's Description; None when the unit is not loaded.
    async fn unit_description(&self, name: &str) -> Result<Option<String>, Error>;
}

#[async_trait::async_trait]
impl UnitManager for Systemd {
    async fn manager_info(&self) -> Result<ManagerInfo, Error> {
        Systemd::manager_info(self).await
    }
    async fn start_transient_unit(&self, name: &str, properties: UnitProperties) -> Result<(), Error> {
        Systemd::start_transient_unit(self, name, properties).await
    }
    async fn start_transient_unit_unless_loaded(&self, name: &str, properties: UnitProperties) -> Result<bool, Error> {
        Systemd::start_transient_unit_unless_loaded(self, name, properties).await
    }
    async fn stop_unit(&self, name: &str) -> Result<(), Error> {
        Systemd::stop_unit(self, name).await
    }
    async fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> Result<(), Error> {
        Systemd::kill_unit(self, name, whom, signal).await
    }
    async fn set_unit_properties(&self, name: &str, properties: UnitProperties) -> Result<(), Error> {
        Systemd::set_unit_properties(self, name, properties).await
    }
    async fn reset_failed_unit(&self, name: &str) -> Result<(), Error> {
        Systemd::reset_failed_unit(self, name).await
    }
    async fn unit_exists(&self, name: &str) -> Result<bool, Error> {
        Systemd::unit_exists(self, name).await
    }
    async fn main_pid(&self, name: &str) -> Result<u32, Error> {
        Systemd::main_pid(self, name).await
    }
    async fn unit_description(&self, name: &str) -> Result<Option<String>, Error> {
        Systemd::unit_description(self, name).await
    }
}

/// How long a start or stop job may take before the runtime gives up waiting (the job goes on).
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

impl Systemd {
    /// Starts transient unit `name` with `properties` and waits for its start job to finish.
    /// `Type=notify` services finish starting when they send READY=1.
    #[tracing::instrument(name = "systemd.start_unit", skip_all, fields(systemd.unit = %name))]
    pub async fn start_transient_unit(&self, name: &str, properties: UnitProperties) -> Result<(), Error> {
        let job_error = |reason: String| Error::Unit { unit: name.to_string(), action: "start", reason };
        let connection = self.connection().await?;
        let manager = ManagerProxy::new(&connection).await.map_err(|e| job_error(e.to_string()))?;
        // Subscribe before queueing the job so that its JobRemoved signal cannot be missed.
        let mut removed = manager.receive_job_removed().await.map_err(|e| job_error(e.to_string()))?;
        let job =
            manager.start_transient_unit(name, "fail", &properties, &[]).await.map_err(|e| job_error(e.to_string()))?;
        self.wait_for_job(&mut removed, &job, name, "start").await
    }

    /// As [`Systemd::start_transient_unit`], but a unit of that name that systemd has already
    /// loaded is left as it is: false then, true when this call started it.
    #[tracing::instrument(name = "systemd.start_unit", skip_all, fields(systemd.unit = %name))]
    pub async fn start_transient_unit_unless_loaded(
        &self,
        name: &str,
        properties: UnitProperties,
    ) -> Result<bool, Error> {
        let job_error = |reason: String| Error::Unit { unit: name.to_string(), action: "start", reason };
        let connection = self.connection().await?;
        let manager = ManagerProxy::new(&connection).await.map_err(|e| job_error(e.to_string()))?;
        let mut removed = manager.receive_job_removed().await.map_err(|e| job_error(e.to_string()))?;
        match manager.start_transient_unit(name, "fail", &properties, &[]).await {
            Ok(job) => self.wait_for_job(&mut removed, &job, name, "start").await.map(|()| true),
            Err(e) if is_unit_exists(&e) => Ok(false),
            Err(e) => Err(job_error(e.to_string())),
        }
    }

    /// Stops unit `name` (and, for a slice, every unit in it) and waits for the stop job. A unit
    /// that does not exist is already stopped.
    #[tracing::instrument(name = "systemd.stop_unit", skip_all, fields(systemd.unit = %name))]
    pub async fn stop_unit(&self, name: &str) -> Result<(), Error> {
        let job_error = |reason: String| Error::Unit { unit: name.to_string(), action: "stop", reason };
        let connection = self.connection().await?;
        let manager = ManagerProxy::new(&connection).await.map_err(|e| job_error(e.to_string()))?;
        let mut removed = manager.receive_job_removed().await.map_err(|e| job_error(e.to_string()))?;
        match manager.stop_unit(name, "replace").await {
            Ok(job) => self.wait_for_job(&mut removed, &job, name, "stop").await,
            Err(e) if is_no_such_unit(&e) => Ok(()),
            Err(e) => Err(job_error(e.to_string())),
        }
    }

    /// Sends `signal` to the processes of unit `name` (`whom`: "main" or "all"); a unit that is
    /// gone is fine.
    pub async fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> Result<(), Error> {
        let connection = self.connection().await?;
        let manager = ManagerProxy::new(&connection).await?;
        match manager.kill_unit(name, whom, signal).await {
            Ok(()) => Ok(()),
            Err(e) if is_no_such_unit(&e) || is_not_running(&e) => Ok(()),
            Err(e) => Err(Error::Unit { unit: name.to_string(), action: "signal", reason: e.to_string() }),
        }
    }

    /// Changes properties of a loaded unit until it is unloaded.
    pub async fn set_unit_properties(&self, name: &str, properties: UnitProperties) -> Result<(), Error> {
        let connection = self.connection().await?;
        let manager = ManagerProxy::new(&connection).await?;
        match manager.set_unit_properties(name, true, &properties).await {
            Ok(()) => Ok(()),
            Err(e) if is_no_such_unit(&e) => Ok(()),
            Err(e) => Err(Error::Unit { unit: name.to_string(), action: "change", reason: e.to_string() }),
        }
    }

    /// Forgets a failed unit's state so that its name can be reused; absent units are fine.
    pub async fn reset_failed_unit(&self, name: &str) -> Result<(), Error> {
        let connection = self.connection().await?;
        let manager = ManagerProxy::new(&connection).await?;
        match manager.reset_failed_unit(name).await {
            Ok(()) => Ok(()),
            Err(e) if is_no_such_unit(&e) => Ok(()),
            Err(e) => Err(Error::Unit { unit: name.to_string(), action: "reset", reason: e.to_string() }),
        }
    }

    /// Whether systemd has unit `name` loaded (running, failed, or otherwise remembered).
    pub async fn unit_exists(&self, name: &str) -> Result<bool, Error> {
        let connection = self.connection().await?;
        let manager = ManagerProxy::new(&connection).await?;
        match manager.get_unit(name).await {
            Ok(_) => Ok(true),
            Err(e) if is_no_such_unit(&e) => Ok(false),
            Err(e) => Err(Error::Unit { unit: name.to_string(), action: "look up", reason: e.to_string() }),
        }
    }

    /// The main PID of service `name`; 0 when it has none (not running). A unit that does not
    /// exist has none either.
    pub async fn main_pid(&self, name: &str) -> Result<u32, Error> {
        let pid = self.unit_property::<u32>(name, "org.freedesktop.systemd1.Service", "MainPID").await?;
        Ok(pid.unwrap_or(0))
    }

    /// The Description of unit `name`; None when systemd has no such unit loaded.
    pub async fn unit_description(&self, name: &str) -> Result<Option<String>, Error> {
        self.unit_property(name, "org.freedesktop.systemd1.Unit", "Description").await
    }

    /// Property `property` of `interface` of unit `name`; None when systemd has no such unit.
    async fn unit_property<T>(&self, name: &str, interface: &'static str, property: &str) -> Result<Option<T>, Error>
    where
        T: TryFrom<zbus::zvariant::OwnedValue>,
        T::Error: Into<zbus::Error>,
    {
        let connection = self.connection().await?;
        let manager = ManagerProxy::new(&connection).await?;
        let path = match manager.get_unit(name).await {
            Ok(path) => path,
            Err(e) if is_no_such_unit(&e) => return Ok(None),
            Err(e) => return Err(Error::Unit { unit: name.to_string(), action: "look up", reason: e.to_string() }),
        };
        // No property cache: zbus's default fills it with a GetAll of the unit's ~250 properties
        // (and a PropertiesChanged match) at the first read, which costs systemd several ms per
        // call and delayed the next start by as much (bench lifecycle: Create+Start 37.5 -> 21 ms).
        let proxy: zbus::Proxy<'_> = zbus::proxy::Builder::new(&connection)
            .destination("org.freedesktop.systemd1")?
            .path(path)?
            .interface(interface)?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        proxy.get_property::<T>(property).await.map(Some).map_err(|e| Error::Unit {
            unit: name.to_string(),
            action: "read a property of",
            reason: format!("{property}: {e}"),
        })
    }

    async fn wait_for_job(
        &self,
        removed: &mut JobRemovedStream,
        job: &OwnedObjectPath,
        unit: &str,
        action: &'static str,
    ) -> Result<(), Error> {
        let wait = async {
            while let Some(signal) = removed.next().await {
                let Ok(args) = signal.args() else { continue };
                if args.job == *job {
                    return Ok(args.result);
                }
            }
            Err("the bus connection closed".to_string())
        };
        let result = tokio::time::timeout(JOB_TIMEOUT, wait)
            .await
            .map_err(|_| format!("the {action} job did not finish within {JOB_TIMEOUT:?}"))
            .and_then(|r| r)
            .map_err(|reason| Error::Unit { unit: unit.to_string(), action, reason })?;
        match result.as_str() {
            "done" => Ok(()),
            other => Err(Error::Unit { unit: unit.to_string(), action, reason: format!("job result {other:?}") }),
        }
    }
}

fn is_not_running(error: &zbus::Error) -> bool {
    matches!(error, zbus::Error::MethodError(name, _, _) if name.as_str() == "org.freedesktop.systemd1.NoSuchProcess")
}

fn is_unit_exists(error: &zbus::Error) -> bool {
    matches!(error, zbus::Error::MethodError(name, _, _) if name.as_str() == "org.freedesktop.systemd1.UnitExists")
}

fn is_no_such_unit(error: &zbus::Error) -> bool {
    matches!(error, zbus::Error::MethodError(name, _, _) if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit")
}
