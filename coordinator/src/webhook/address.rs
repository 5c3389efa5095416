//! Which addresses a webhook may reach: a submitter must not be able to use
//! the coordinator to probe its network, so without `--webhook-allow-private`
//! every address a target's host resolves to must be public. The check runs
//! at delivery time on the addresses the request then connects to, so a name
//! that resolves elsewhere later cannot slip past a check made at submission.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use kiln_proto::webhook::Target;

/// Longest a target's name may take to resolve.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Returns true for an address on the public internet: not loopback,
/// private (RFC 1918, IPv6 unique local), link-local, shared (RFC 6598),
/// unspecified, broadcast, multicast, documentation, benchmarking or
/// reserved. An IPv4 address inside IPv6 is judged as IPv4.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        // Shared address space (carrier-grade NAT), RFC 6598.
        || (a == 100 && (64..128).contains(&b))
        // IETF protocol assignments, RFC 6890.
        || (a == 192 && b == 0 && c == 0)
        // Benchmarking, RFC 2544.
        || (a == 198 && (b == 18 || b == 19))
        // Reserved for future use.
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // Unique local, fc00::/7.
        || (first & 0xfe00) == 0xfc00
        // Link-local, fe80::/10.
        || (first & 0xffc0) == 0xfe80
        // Documentation, 2001:db8::/32.
        || (first == 0x2001 && ip.segments()[1] == 0x0db8)
        // IPv4-compatible and other addresses under ::/96.
        || ip.segments()[..6].iter().all(|s| *s == 0))
}

/// Why a target cannot be called now.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// The name did not resolve (or not in time); it may later.
    #[error("cannot resolve {host}: {reason}")]
    Unresolved {
        /// The target's host.
        host: String,
        /// The resolver's words.
        reason: String,
    },
    /// The host resolves to an address webhooks may not reach.
    #[error(
        "{host} resolves to {address}, which is not a public address; give --webhook-allow-private to allow it"
    )]
    Private {
        /// The target's host.
        host: String,
        /// The first address refused.
        address: IpAddr,
    },
}

impl AddressError {
    /// Returns true when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, AddressError::Unresolved { .. })
    }
}

/// Resolves a target's host (an address is taken as it is) and, unless
/// `allow_private`, refuses it when any of its addresses is not public.
/// Returns the addresses the request must connect to.
///
/// # Errors
/// `Unresolved` when the name does not resolve within [`RESOLVE_TIMEOUT`],
/// `Private` for a refused address.
pub async fn resolve(
    target: &Target<'_>,
    allow_private: bool,
) -> Result<Vec<SocketAddr>, AddressError> {
    let addrs: Vec<SocketAddr> = match target.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, target.port)],
        Err(_) => {
            let unresolved = |reason: String| AddressError::Unresolved {
                host: target.host.to_string(),
                reason,
            };
            let found = tokio::time::timeout(
                RESOLVE_TIMEOUT,
                tokio::net::lookup_host((target.host, target.port)),
            )
            .await
            .map_err(|_| unresolved(format!("no answer within {RESOLVE_TIMEOUT:?}")))?
            .map_err(|e| unresolved(e.to_string()))?;
            found.collect()
        }
    };
    if addrs.is_empty() {
        return Err(AddressError::Unresolved {
            host: target.host.to_string(),
            reason: "no address".into(),
        });
    }
    if !allow_private && let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
        return Err(AddressError::Private {
            host: target.host.to_string(),
            address: bad.ip(),
        });
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_addresses_are_not_public() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a}");
        }
        for a in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            assert!(is_public(a.parse().unwrap()), "{a}");
        }
    }

    #[tokio::test]
    async fn loopback_targets_are_refused_unless_allowed() {
        for url in [
            "http://127.0.0.1:9/x",
            "http://localhost:9/x",
            "http://[::1]:9/",
        ] {
            let target = kiln_proto::webhook::parse_target("t", url).unwrap();
            let e = resolve(&target, false).await.unwrap_err();
            assert!(matches!(e, AddressError::Private { .. }), "{url}: {e}");
            assert!(!e.is_transient());
            assert!(
                e.to_string().contains("give --webhook-allow-private"),
                "{e}"
            );
            let addrs = resolve(&target, true).await.unwrap();
            assert!(addrs.iter().all(|a| a.port() == 9));
        }
    }
}
