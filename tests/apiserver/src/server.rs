//! The handle a test holds: starting, stopping and restarting the server, and the test controls
//! that read and write the store directly (same revisions and watch events, no auth, no
//! admission).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::net::{TcpListener, TcpSocket};

use crate::admission::{AdmissionHook, AdmissionRequest, Operation};
use crate::auth::{Authenticated, Authenticator, KeyError, ServiceAccountToken, UserInfo};
use crate::http::Listening;
use crate::resource::Resource;
use crate::status::{ApiError, Reason};
use crate::store::{Plan, ResourceId, Store, WriteOp};

/// How often a write that raced with another is planned again before giving up with 409.
const WRITE_ATTEMPTS: usize = 16;

/// Server settings; `Default` suits most tests.
#[derive(Clone, Debug)]
pub struct Config {
    /// The API audience: service-account tokens must name it to call the API, and a TokenReview
    /// without `spec.audiences` checks for it (kube-apiserver's `--api-audiences`).
    pub audience: String,
    /// `iss` of the tokens the server issues (`--service-account-issuer`).
    pub issuer: String,
    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK (the real server: about a
    /// minute; short here so tests see them).
    pub bookmark_interval: Duration,
    /// A static token for a cluster admin (`system:masters`), registered at start.
    pub admin_token: String,
    /// Where to listen: loopback on a free port unless a test needs the
    /// server reachable from its network namespaces.
    pub listen: SocketAddr,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            audience: "https://kubernetes.default.svc".to_owned(),
            issuer: "https://kubernetes.default.svc".to_owned(),
            bookmark_interval: Duration::from_secs(1),
            admin_token: "meshguard-test-admin".to_owned(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("the server is already running")]
    Running,
}

/// The Kubernetes verb of a request, for [`ApiServer::requests`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
}

/// One HTTP request the server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub verb: Verb,
    pub path: String,
    /// `pods`, `pods/status`, `tokenreviews`; `None` for discovery and other non-resource paths.
    pub resource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// The authenticated user, `None` when authentication failed or was not needed.
    pub user: Option<String>,
    /// The HTTP status of the response (200 for a watch, whatever its events).
    pub code: u16,
}

/// Names one object for the test controls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectKey {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectKey {
    pub fn namespaced(api_version: &str, kind: &str, namespace: &str, name: &str) -> Self {
        ObjectKey {
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
            namespace: Some(namespace.to_owned()),
            name: name.to_owned(),
        }
    }

    pub fn cluster(api_version: &str, kind: &str, name: &str) -> Self {
        ObjectKey { api_version: api_version.to_owned(), kind: kind.to_owned(), namespace: None, name: name.to_owned() }
    }
}

/// State shared by the handle, the connections and the watch tasks.
pub(crate) struct Shared {
    store: Mutex<Store>,
    pub(crate) auth: Authenticator,
    admission: RwLock<Option<AdmissionHook>>,
    bookmark_interval: Mutex<Duration>,
    requests: Mutex<Vec<RequestRecord>>,
    pub(crate) addr: SocketAddr,
}

/// Who is writing through HTTP: admission runs for them.
pub(crate) struct Admit<'a> {
    pub(crate) user: &'a UserInfo,
    pub(crate) dry_run: bool,
}

pub(crate) struct Written {
    pub(crate) object: Value,
    pub(crate) created: bool,
}

// A poisoned lock only means a test panicked while holding it; the data is still consistent
// enough for the remaining assertions, so keep serving rather than cascade panics.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// === impl Shared ===

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn bookmark_interval(&self) -> Duration {
        *lock(&self.bookmark_interval)
    }

    pub(crate) fn record(&self, r: RequestRecord) {
        lock(&self.requests).push(r);
    }

    pub(crate) fn authenticate(&self, token: &str, audiences: &[String]) -> Result<Authenticated, String> {
        let store = self.lock();
        self.auth.authenticate(token, audiences, &*store)
    }

    /// Plans, admits (for HTTP writers) and commits a write, planning again if the object
    /// changed while admission ran.
    pub(crate) fn write(
        &self,
        id: ResourceId,
        namespace: Option<&str>,
        name: Option<&str>,
        op: &WriteOp,
        admit: Option<Admit<'_>>,
    ) -> Result<Written, ApiError> {
        for _ in 0..WRITE_ATTEMPTS {
            let (plan, res, ns_object) = {
                let store = self.lock();
                let plan = store.plan(id, namespace, name, op)?;
                let ns_object = plan.namespace.as_deref().and_then(|ns| store.namespace_object(ns));
                (plan, store.resource(id).clone(), ns_object)
            };
            let created = plan.operation == Operation::Create;
            if let Some(a) = &admit {
                self.admit(&res, &plan, a, ns_object)?;
                if a.dry_run {
                    return Ok(Written { object: plan.preview(), created });
                }
            }
            if let Ok(object) = self.lock().commit(plan) {
                return Ok(Written { object, created });
            }
        }
        let name = name.unwrap_or("");
        Err(ApiError::conflict(&self.lock().resource(id).clone(), name, "the object is being modified too often; try again"))
    }

    fn admit(&self, res: &Resource, plan: &Plan, a: &Admit<'_>, namespace_object: Option<Value>) -> Result<(), ApiError> {
        let Some(hook) = self.admission.read().unwrap_or_else(|e| e.into_inner()).clone() else { return Ok(()) };
        let req = AdmissionRequest {
            operation: plan.operation,
            group: res.group.clone(),
            version: res.version.clone(),
            resource: res.plural.clone(),
            sub_resource: plan.status.then(|| "status".to_owned()),
            kind: res.kind.clone(),
            namespace: plan.namespace.clone(),
            name: plan.name.clone(),
            user_info: a.user.clone(),
            object: plan.object().cloned(),
            old_object: plan.prev.as_deref().cloned(),
            namespace_object,
            dry_run: a.dry_run,
        };
        hook(&req).map_err(|why| ApiError::denied(res, &plan.name, &why))
    }
}

/// An in-process Kubernetes API server on `127.0.0.1` and an ephemeral port.
///
/// Dropping it stops the server.
pub struct ApiServer {
    shared: Arc<Shared>,
    admin_token: String,
    listening: Mutex<Option<Listening>>,
}

// === impl ApiServer ===

impl ApiServer {
    /// Starts a server with [`Config::default`]. Needs a Tokio runtime.
    pub async fn start() -> Result<Self, StartError> {
        Self::start_with(Config::default()).await
    }

    pub async fn start_with(config: Config) -> Result<Self, StartError> {
        let listener = listen(config.listen)?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen { addr: config.listen, source })?;
        let auth = Authenticator::new(&config.issuer, &config.audience)?;
        auth.add_static(&config.admin_token, UserInfo::new("admin", &["system:masters"]));
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(Resource::builtins())),
            auth,
            admission: RwLock::new(None),
            bookmark_interval: Mutex::new(config.bookmark_interval),
            requests: Mutex::default(),
            addr,
        });
        tracing::debug!(%addr, "test API server listening");
        let listening = Listening::spawn(listener, shared.clone());
        Ok(ApiServer { shared, admin_token: config.admin_token, listening: Mutex::new(Some(listening)) })
    }

    /// `http://127.0.0.1:<port>`; the same across [`ApiServer::restart`].
    pub fn url(&self) -> String {
        self.shared.url()
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The static token of a cluster admin (user `admin`, group `system:masters`).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// A kubeconfig for this server as the admin, as a client outside the
    /// cluster would read it.
    pub fn admin_kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: test, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: admin, user: {{token: \"{}\"}}}}]\n\
             contexts: [{{name: test, context: {{cluster: test, user: admin}}}}]\ncurrent-context: test\n",
            self.url(),
            self.admin_token
        )
    }

    /// Serves another resource (or replaces the definition of one, keeping its objects).
    pub fn register(&self, resource: Resource) {
        self.shared.lock().register(resource);
    }

    /// Accepts `token` as a bearer token for `user` (`system:authenticated` is added).
    pub fn add_token(&self, token: &str, user: UserInfo) {
        self.shared.auth.add_static(token, user);
    }

    /// Signs a service-account token as kube-apiserver's TokenRequest would. The service
    /// account's uid is its ServiceAccount object's when one exists.
    pub fn issue_token(&self, spec: ServiceAccountToken) -> Result<String, jsonwebtoken::errors::Error> {
        let sa_uid = {
            let store = self.shared.lock();
            crate::auth::BoundObjects::uid(&*store, "serviceaccounts", Some(&spec.namespace), &spec.service_account)
        };
        self.shared.auth.issue(&spec, sa_uid)
    }

    /// Runs `hook` for every write made over HTTP (not for the test controls).
    pub fn set_admission(&self, hook: AdmissionHook) {
        *self.shared.admission.write().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    pub fn clear_admission(&self) {
        *self.shared.admission.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Applies to bookmarks sent from now on, on open watches too.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        *lock(&self.shared.bookmark_interval) = interval;
    }

    // --- test controls: the store directly ---

    /// Creates an object (type from its `apiVersion` and `kind`, namespace `default` if none).
    /// Unlike a POST it keeps `.status`, so fixtures can describe running pods.
    pub fn create(&self, object: Value) -> Result<Value, ApiError> {
        let (id, ns, _) = self.resolve_object(&object)?;
        self.shared.write(id, ns.as_deref(), None, &WriteOp::Create { object, whole: true }, None).map(|w| w.object)
    }

    /// Replaces an object whole, `.status` included, whatever its resourceVersion says.
    pub fn update(&self, object: Value) -> Result<Value, ApiError> {
        let (id, ns, name) = self.resolve_object(&object)?;
        let op = WriteOp::Replace { object, status: false, whole: true };
        self.shared.write(id, ns.as_deref(), Some(&name), &op, None).map(|w| w.object)
    }

    /// Deletes an object (or marks it for deletion while it has finalizers) and returns its last
    /// state.
    pub fn delete(&self, key: &ObjectKey) -> Result<Value, ApiError> {
        let id = self.resolve(&key.api_version, &key.kind)?;
        let op = WriteOp::Delete { resource_version: None, uid: None };
        self.shared.write(id, key.namespace.as_deref(), Some(&key.name), &op, None).map(|w| w.object)
    }

    pub fn get(&self, key: &ObjectKey) -> Option<Value> {
        let id = self.resolve(&key.api_version, &key.kind).ok()?;
        let store = self.shared.lock();
        store.get(id, &store.key(id, key.namespace.as_deref(), &key.name)).map(|v| (**v).clone())
    }

    /// Every object of a type, in key order (`namespace/name`).
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let Ok(id) = self.resolve(api_version, kind) else { return Vec::new() };
        self.shared.lock().objects(id).values().map(|v| (**v).clone()).collect()
    }

    /// The current revision (the resourceVersion of the latest write).
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().revision()
    }

    /// Forgets the history: watches and consistent list pages from any older resourceVersion get
    /// 410 Expired, as after an etcd compaction.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// Cuts every open watch connection mid-stream (no final chunk), as a dying server would.
    pub fn close_watches(&self) {
        self.shared.lock().history.close_all();
    }

    /// How many watches are open now.
    pub fn open_watches(&self) -> usize {
        self.shared.lock().history.open_watches()
    }

    /// Stops listening and cuts every connection; the store is kept.
    pub async fn stop(&self) {
        let listening = lock(&self.listening).take();
        self.close_watches();
        if let Some(l) = listening {
            l.stop().await;
        }
    }

    /// Stops if running, then listens again on the same port with the same store.
    pub async fn restart(&self) -> Result<(), StartError> {
        self.stop().await;
        let listener = listen(self.shared.addr)?;
        let mut slot = lock(&self.listening);
        if slot.is_some() {
            return Err(StartError::Running);
        }
        *slot = Some(Listening::spawn(listener, self.shared.clone()));
        Ok(())
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).clone()
    }

    pub fn request_count(&self, verb: Verb) -> usize {
        lock(&self.shared.requests).iter().filter(|r| r.verb == verb).count()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    fn resolve(&self, api_version: &str, kind: &str) -> Result<ResourceId, ApiError> {
        self.shared
            .lock()
            .find_kind(api_version, kind)
            .ok_or_else(|| ApiError::new(Reason::NotFound, format!("no resource is registered for {api_version} {kind}")))
    }

    fn resolve_object(&self, object: &Value) -> Result<(ResourceId, Option<String>, String), ApiError> {
        let s = |p| crate::meta::str_at(object, p).unwrap_or("");
        let id = self.resolve(s("/apiVersion"), s("/kind"))?;
        Ok((id, crate::meta::namespace(object).map(str::to_owned), s("/metadata/name").to_owned()))
    }
}

/// Binds with `SO_REUSEADDR`, so a restart gets the same port while old connections linger in
/// TIME_WAIT.
fn listen(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Listen { addr, source };
    let socket = TcpSocket::new_v4().map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}
