//! The `CNI_*` environment a runtime invokes the plugin with: the one place
//! the plugin reads its environment, through a lookup function so tests
//! pass a map.

use std::collections::BTreeMap;

use crate::spec::{CniError, code};

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    /// 1.1.0: drop state of attachments the runtime no longer knows.
    Gc,
    /// 1.1.0: whether ADD can be served.
    Status,
}

/// One invocation, as the environment describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    /// `CNI_ARGS`, by key.
    pub args: BTreeMap<String, String>,
}

/// The pod a Kubernetes runtime names in `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
}

// === impl Command ===

impl Command {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            _ => return None,
        })
    }
}

// === impl Invocation ===

impl Invocation {
    /// Reads the invocation through `var` (`std::env::var` in the binary).
    pub fn from_vars(var: &dyn Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let invalid = |msg: String| CniError::new(code::INVALID_ENVIRONMENT, msg, "");
        let command = match var("CNI_COMMAND") {
            None => return Err(invalid("CNI_COMMAND is not set: meshguard-cni is run by a container runtime (see the CNI spec)".into())),
            Some(c) => Command::parse(&c)
                .ok_or_else(|| invalid(format!("CNI_COMMAND {c:?} is not one of ADD, DEL, CHECK, VERSION, GC, STATUS")))?,
        };
        let set = |k: &str| var(k).filter(|v| !v.is_empty());
        Ok(Self {
            command,
            container_id: set("CNI_CONTAINERID"),
            netns: set("CNI_NETNS"),
            ifname: set("CNI_IFNAME"),
            args: parse_args(&var("CNI_ARGS").unwrap_or_default()).map_err(invalid)?,
        })
    }

    /// Fails naming every variable of `names` that is missing.
    pub fn require(&self, names: &[&str]) -> Result<(), CniError> {
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| match *n {
                "CNI_CONTAINERID" => self.container_id.is_none(),
                "CNI_NETNS" => self.netns.is_none(),
                "CNI_IFNAME" => self.ifname.is_none(),
                _ => false,
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(CniError::new(code::INVALID_ENVIRONMENT, format!("{} must be set for {:?}", missing.join(", "), self.command), ""))
    }

    /// `K8S_POD_NAMESPACE` and `K8S_POD_NAME`, as kubelet's runtimes pass them.
    pub fn pod(&self) -> Result<PodName, CniError> {
        match (self.args.get("K8S_POD_NAMESPACE"), self.args.get("K8S_POD_NAME")) {
            (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => Ok(PodName { namespace: ns.clone(), name: name.clone() }),
            _ => Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                "CNI_ARGS names no pod (K8S_POD_NAMESPACE and K8S_POD_NAME): meshguard enforces Kubernetes pods, which kubelet's runtimes name there",
                "",
            )),
        }
    }

    pub fn container_id(&self) -> &str {
        self.container_id.as_deref().unwrap_or_default()
    }

    pub fn ifname(&self) -> &str {
        self.ifname.as_deref().unwrap_or_default()
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;` (values may be empty).
pub fn parse_args(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in text.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(format!("CNI_ARGS: {pair:?} is not KEY=VALUE"));
        };
        if k.is_empty() {
            return Err(format!("CNI_ARGS: {pair:?} has no key"));
        }
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn kubelets_args_name_the_pod() {
        // As containerd passes them (CRI-O's are the same keys).
        let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-7d4b9c;K8S_POD_INFRA_CONTAINER_ID=0f3a;K8S_POD_UID=5c1e-77";
        let inv = Invocation::from_vars(&vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "0f3a"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", args),
            ("CNI_PATH", "/opt/cni/bin"),
        ]))
        .unwrap();
        assert_eq!(inv.command, Command::Add);
        assert_eq!(inv.pod().unwrap(), PodName { namespace: "shop".into(), name: "web-7d4b9c".into() });
        assert_eq!(inv.args["IgnoreUnknown"], "1");
        inv.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]).unwrap();
    }

    #[test]
    fn empty_values_and_a_trailing_separator_are_fine() {
        let a = parse_args("A=;B=x=y;").unwrap();
        assert_eq!(a["A"], "");
        assert_eq!(a["B"], "x=y");
        assert!(parse_args("").unwrap().is_empty());
    }

    #[test]
    fn bad_environments_say_which_variable() {
        let err = |pairs: &[(&str, &str)]| Invocation::from_vars(&vars(pairs)).unwrap_err();
        assert!(err(&[]).msg.contains("CNI_COMMAND is not set"));
        assert!(err(&[("CNI_COMMAND", "add")]).msg.contains("not one of"));
        let e = err(&[("CNI_COMMAND", "ADD"), ("CNI_ARGS", "K8S_POD_NAME")]);
        assert_eq!(e.code, code::INVALID_ENVIRONMENT);
        assert!(e.msg.contains("not KEY=VALUE"), "{}", e.msg);
        assert!(err(&[("CNI_COMMAND", "ADD"), ("CNI_ARGS", "=x")]).msg.contains("no key"));

        let inv = Invocation::from_vars(&vars(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", "")])).unwrap();
        let e = inv.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]).unwrap_err();
        assert_eq!(e.msg, "CNI_CONTAINERID, CNI_NETNS must be set for Add");
        let e = inv.pod().unwrap_err();
        assert_eq!(e.code, code::INVALID_ENVIRONMENT);
        let inv = Invocation::from_vars(&vars(&[("CNI_COMMAND", "DEL"), ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=")])).unwrap();
        assert!(inv.pod().is_err(), "an empty pod name names no pod");
    }
}
