//! The connection to systemd's manager (`org.freedesktop.systemd1`) over the system bus.
//!
//! Only the system bus is used: systemd's private socket (`/run/systemd/private`) sends messages
//! whose sender name zbus rejects (zbus issue #1497), so it cannot serve as a fallback.

use std::time::Duration;

use tokio::sync::Mutex;
use tracing::debug;
use zbus::Connection;

use crate::Error;

/// How long to wait for the bus before calling systemd unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub(crate) trait Manager {
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
        let unreachable = |reason: String| Error::SystemdUnreachable {
            address: self.bus_address.clone(),
            reason,
        };
        let builder = zbus::connection::Builder::address(self.bus_address.as_str())
            .map_err(|e| unreachable(e.to_string()))?;
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
