//! OpenKruise SidecarSet hot upgrade: Kruise runs two containers of the sidecar
//! (`legate-1`, `legate-2`) and tells each which one it is with two variables.
//! `SIDECARSET_VERSION` is this container's version, `SIDECARSET_VERSION_ALT` the other's.
//!
//! | VERSION / ALT | meaning | legate |
//! | --- | --- | --- |
//! | ALT unset or 0 | the only working container | start normally |
//! | VERSION > ALT | the upgrade: the other one is older | take over from it (a normal start finds it on the handoff socket) |
//! | VERSION = 0 | the "empty" container, a placeholder | bind nothing, exit 0 on SIGTERM |
//! | VERSION < ALT | this, the older one, restarted after the other took over | bind nothing, exit 0 on SIGTERM |

pub(crate) const VERSION: &str = "SIDECARSET_VERSION";
pub(crate) const VERSION_ALT: &str = "SIDECARSET_VERSION_ALT";

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Bind and serve (taking over from the other container if it serves).
    Serve,
    /// Bind nothing; wait for SIGTERM. The reason is logged.
    Idle(&'static str),
}

/// The role the environment gives this process.
pub(crate) fn role() -> Result<Role, String> {
    role_from(
        std::env::var(VERSION).ok().as_deref(),
        std::env::var(VERSION_ALT).ok().as_deref(),
    )
}

fn role_from(version: Option<&str>, alt: Option<&str>) -> Result<Role, String> {
    let parse = |name: &str, value: Option<&str>| -> Result<Option<u64>, String> {
        match value.map(str::trim) {
            None | Some("") => Ok(None),
            Some(text) => text
                .parse()
                .map(Some)
                .map_err(|_| format!("{name}={text:?} is not a version number")),
        }
    };
    let version = parse(VERSION, version)?;
    let alt = parse(VERSION_ALT, alt)?;
    Ok(match (version, alt) {
        (Some(0), _) => Role::Idle("SIDECARSET_VERSION=0: the empty container of a hot upgrade"),
        (Some(version), Some(alt)) if alt > 0 && version < alt => Role::Idle(
            "SIDECARSET_VERSION is below SIDECARSET_VERSION_ALT: the other container has taken over",
        ),
        _ => Role::Serve,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decision_table() {
        assert_eq!(role_from(None, None), Ok(Role::Serve));
        assert_eq!(role_from(Some("1"), None), Ok(Role::Serve));
        assert_eq!(role_from(Some("1"), Some("0")), Ok(Role::Serve));
        assert_eq!(role_from(Some("3"), Some("2")), Ok(Role::Serve));
        assert!(matches!(role_from(Some("0"), Some("2")), Ok(Role::Idle(_))));
        assert!(matches!(role_from(Some("0"), None), Ok(Role::Idle(_))));
        assert!(matches!(role_from(Some("2"), Some("3")), Ok(Role::Idle(_))));
        assert!(role_from(Some("two"), None).is_err());
        assert!(role_from(Some("1"), Some("-1")).is_err());
    }
}
