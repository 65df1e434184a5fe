//! An in-memory [`UnitManager`] for unit tests: it records every call, keeps the set of loaded
//! units (a slice's stop takes its units with it, as systemd does), and fails the calls a test
//! chooses. Only for the runtime's own logic; what systemd really does is the e2e tests' business.

use std::collections::BTreeMap;
use std::sync::Mutex;

use zbus::zvariant::Value;

use crate::Error;
use crate::systemd::{ManagerInfo, UnitManager, UnitProperties};

/// One call the runtime made, with the unit it named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    Start(String),
    StartUnlessLoaded(String),
    Stop(String),
    Kill { unit: String, whom: String, signal: i32 },
    SetProperties(String),
    ResetFailed(String),
    UnitExists(String),
    MainPid(String),
    Description(String),
}

impl Call {
    fn method(&self) -> &'static str {
        match self {
            Call::Start(_) => "start",
            Call::StartUnlessLoaded(_) => "start_unless_loaded",
            Call::Stop(_) => "stop",
            Call::Kill { .. } => "kill",
            Call::SetProperties(_) => "set_properties",
            Call::ResetFailed(_) => "reset_failed",
            Call::UnitExists(_) => "unit_exists",
            Call::MainPid(_) => "main_pid",
            Call::Description(_) => "description",
        }
    }

    fn unit(&self) -> &str {
        match self {
            Call::Start(u)
            | Call::StartUnlessLoaded(u)
            | Call::Stop(u)
            | Call::Kill { unit: u, .. }
            | Call::SetProperties(u)
            | Call::ResetFailed(u)
            | Call::UnitExists(u)
            | Call::MainPid(u)
            | Call::Description(u) => u,
        }
    }
}

type StopHook = Box<dyn Fn(&str) + Send + Sync>;

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    /// Loaded units and the slice each was started in (None: a slice, or no Slice= given).
    loaded: BTreeMap<String, Option<String>>,
    /// The Description each unit was started with.
    descriptions: BTreeMap<String, String>,
    /// (method, unit name): every such call fails.
    failures: Vec<(&'static str, String)>,
    /// Runs with the unit's name when a loaded service stops (what its ExecStopPost would do).
    on_stop: Option<StopHook>,
}

#[derive(Default)]
pub(crate) struct FakeSystemd {
    state: Mutex<State>,
}

impl std::fmt::Debug for FakeSystemd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.lock().expect("fake lock");
        f.debug_struct("FakeSystemd").field("calls", &state.calls).field("loaded", &state.loaded).finish()
    }
}

impl FakeSystemd {
    /// Every later call of `method` (see [`Call`]'s names: "start", "stop", ...) on `unit` fails.
    pub(crate) fn fail(&self, method: &'static str, unit: &str) {
        self.state.lock().expect("fake lock").failures.push((method, unit.to_string()));
    }

    /// A unit loaded by someone else (the kubelet's slice).
    pub(crate) fn load(&self, unit: &str) {
        self.state.lock().expect("fake lock").loaded.insert(unit.to_string(), None);
    }

    pub(crate) fn on_stop(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        self.state.lock().expect("fake lock").on_stop = Some(Box::new(hook));
    }

    pub(crate) fn loaded(&self) -> Vec<String> {
        self.state.lock().expect("fake lock").loaded.keys().cloned().collect()
    }

    pub(crate) fn is_loaded(&self, unit: &str) -> bool {
        self.state.lock().expect("fake lock").loaded.contains_key(unit)
    }

    pub(crate) fn calls(&self) -> Vec<Call> {
        self.state.lock().expect("fake lock").calls.clone()
    }

    /// Records the call; the injected failure if one matches.
    fn record(&self, call: Call) -> Result<(), Error> {
        let mut state = self.state.lock().expect("fake lock");
        let failed = state.failures.iter().any(|(method, unit)| *method == call.method() && unit == call.unit());
        let error =
            Error::Unit { unit: call.unit().to_string(), action: call.method(), reason: "injected failure".into() };
        state.calls.push(call);
        if failed { Err(error) } else { Ok(()) }
    }

    fn start(&self, name: &str, properties: &UnitProperties) -> Result<(), Error> {
        let property = |name: &str| {
            properties.iter().find(|(key, _)| *key == name).and_then(|(_, value)| match value {
                Value::Str(s) => Some(s.to_string()),
                _ => None,
            })
        };
        let (slice, description) = (property("Slice"), property("Description"));
        let mut state = self.state.lock().expect("fake lock");
        if state.loaded.contains_key(name) {
            return Err(Error::Unit { unit: name.into(), action: "start", reason: "unit exists".into() });
        }
        state.loaded.insert(name.to_string(), slice);
        state.descriptions.insert(name.to_string(), description.unwrap_or_default());
        Ok(())
    }
}

#[async_trait::async_trait]
impl UnitManager for FakeSystemd {
    async fn manager_info(&self) -> Result<ManagerInfo, Error> {
        Ok(ManagerInfo {
            version: "fake".into(),
            features: String::new(),
            virtualization: String::new(),
            system_state: "running".into(),
        })
    }

    async fn start_transient_unit(&self, name: &str, properties: UnitProperties) -> Result<(), Error> {
        self.record(Call::Start(name.into()))?;
        self.start(name, &properties)
    }

    async fn start_transient_unit_unless_loaded(&self, name: &str, properties: UnitProperties) -> Result<bool, Error> {
        self.record(Call::StartUnlessLoaded(name.into()))?;
        if self.is_loaded(name) {
            return Ok(false);
        }
        self.start(name, &properties).map(|()| true)
    }

    async fn stop_unit(&self, name: &str) -> Result<(), Error> {
        self.record(Call::Stop(name.into()))?;
        let (stopped, hook) = {
            let mut state = self.state.lock().expect("fake lock");
            let mut stopped: Vec<String> = state
                .loaded
                .iter()
                .filter(|(_, slice)| slice.as_deref() == Some(name))
                .map(|(u, _)| u.clone())
                .collect();
            if state.loaded.contains_key(name) {
                stopped.push(name.to_string());
            }
            for unit in &stopped {
                state.loaded.remove(unit);
            }
            (stopped, state.on_stop.take())
        };
        if let Some(hook) = hook {
            stopped.iter().filter(|u| u.ends_with(".service")).for_each(|u| hook(u));
            self.state.lock().expect("fake lock").on_stop = Some(hook);
        }
        Ok(())
    }

    async fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> Result<(), Error> {
        self.record(Call::Kill { unit: name.into(), whom: whom.into(), signal })
    }

    async fn set_unit_properties(&self, name: &str, _properties: UnitProperties) -> Result<(), Error> {
        self.record(Call::SetProperties(name.into()))
    }

    async fn reset_failed_unit(&self, name: &str) -> Result<(), Error> {
        self.record(Call::ResetFailed(name.into()))
    }

    async fn unit_exists(&self, name: &str) -> Result<bool, Error> {
        self.record(Call::UnitExists(name.into()))?;
        Ok(self.is_loaded(name))
    }

    async fn main_pid(&self, name: &str) -> Result<u32, Error> {
        // No real process stands behind a fake unit: every main process has ended.
        self.record(Call::MainPid(name.into())).map(|()| 0)
    }

    async fn unit_description(&self, name: &str) -> Result<Option<String>, Error> {
        self.record(Call::Description(name.into()))?;
        let state = self.state.lock().expect("fake lock");
        Ok(state.loaded.contains_key(name).then(|| state.descriptions.get(name).cloned().unwrap_or_default()))
    }
}
