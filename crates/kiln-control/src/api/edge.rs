//! The edges' route table.

use super::*;

#[utoipa::path(get, path = "/v1/routes", tag = "edges", params(WatchQuery),
    security(("bearer" = ["edge"])),
    responses((status = 200, description = "The route table as of `seq` (long-poll).", body = RouteTable)))]
pub(super) async fn routes(
    State(c): Ctl,
    p: Principal,
    Query(q): Query<WatchQuery>,
) -> ApiResult<Json<RouteTable>> {
    require_infra(&c, &p, Scope::Edge).await?;
    let seq = wait_past(&c, &q).await;
    let apps: BTreeMap<AppId, AppRow> = c
        .store
        .apps(None)
        .await?
        .into_iter()
        .map(|a| (a.id.clone(), a))
        .collect();
    let mut shared_ports: BTreeMap<u16, AppId> = BTreeMap::new();
    let mut dedicated: BTreeMap<AppId, Vec<std::net::Ipv4Addr>> = BTreeMap::new();
    for a in c.store.allocations().await? {
        match a.allocation {
            kiln_store::Allocation::SharedPort(port) => {
                shared_ports.insert(port, a.app_id);
            }
            kiln_store::Allocation::DedicatedIpv4(ip) => {
                dedicated.entry(a.app_id).or_default().push(ip)
            }
        }
    }
    let mut table: BTreeMap<String, Route> = BTreeMap::new();
    let mut ports: BTreeMap<SocketAddr, PortRoute> = BTreeMap::new();
    fn port_route<'a>(
        ports: &'a mut BTreeMap<SocketAddr, PortRoute>,
        listen: SocketAddr,
        app: &AppRow,
        svc: &kiln_types::ServiceSpec,
    ) -> &'a mut PortRoute {
        ports.entry(listen).or_insert_with(|| PortRoute {
            listen,
            app: app.name.clone(),
            protocol: svc.protocol,
            proxy_protocol: svc.proxy_protocol,
            backends: Vec::new(),
            concurrency: Some(svc.concurrency),
        })
    }
    // Traffic goes to the serving (healthy) release and to deploys that replace instances in
    // place; a blue-green deploy's new set only once all of it is healthy (the release is then
    // `healthy` and the old one `superseded`, its instances stopping).
    let mut routed: std::collections::BTreeSet<ReleaseId> = c
        .store
        .releases_in_state(ReleaseState::Healthy)
        .await?
        .into_iter()
        .map(|r| r.id)
        .collect();
    routed.extend(
        c.store
            .releases_in_state(ReleaseState::Deploying)
            .await?
            .into_iter()
            .filter(|r| r.manifest["deploy"]["strategy"] != "bluegreen")
            .map(|r| r.id),
    );
    for inst in c.store.all_instances().await? {
        if inst.state != kiln_types::InstanceState::Healthy
            || !inst.desired_running
            || !routed.contains(&inst.release_id)
        {
            continue;
        }
        let Some(app) = apps.get(&inst.app_id) else {
            continue;
        };
        for svc in &inst.spec.services {
            let backend = SocketAddr::new(inst.spec.network.ipv6.into(), svc.internal_port);
            // A dedicated IPv4: TLS on 443 (no SNI needed) and every public port of the app.
            let public_ports: Vec<u16> = match svc.protocol {
                ServiceProtocol::Tls => vec![443],
                ServiceProtocol::Tcp => svc.ports.clone(),
            };
            for ip in dedicated.get(&inst.app_id).into_iter().flatten() {
                for port in &public_ports {
                    let listen = SocketAddr::new((*ip).into(), *port);
                    port_route(&mut ports, listen, app, svc)
                        .backends
                        .push(backend);
                }
            }
            if svc.protocol == ServiceProtocol::Tcp {
                // Shared addresses: the ports the app owns, on every address of every edge.
                for port in svc
                    .ports
                    .iter()
                    .filter(|p| shared_ports.get(p) == Some(&inst.app_id))
                {
                    for any in [
                        std::net::IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
                        std::net::IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
                    ] {
                        port_route(&mut ports, SocketAddr::new(any, *port), app, svc)
                            .backends
                            .push(backend);
                    }
                }
                continue;
            }
            let default_host = format!("{}.{}", app.name, c.config.app_domain);
            for hostname in std::iter::once(default_host).chain(svc.hostnames.iter().cloned()) {
                let route = table.entry(hostname.clone()).or_insert_with(|| Route {
                    hostname,
                    app: app.name.clone(),
                    proxy_protocol: svc.proxy_protocol,
                    backends: Vec::new(),
                    concurrency: Some(svc.concurrency),
                });
                route.backends.push(backend);
            }
        }
    }
    // Verified custom domains route like their app's default hostname (same backends, limits
    // and PROXY setting). A verified domain is its app's alone: another app's manifest
    // `hostnames` naming it is dropped, and with no healthy backend the name is not routed at all.
    for d in c.store.verified_domains().await? {
        let Some(app) = apps.get(&d.app_id) else {
            continue;
        };
        if table
            .get(d.hostname.as_str())
            .is_some_and(|r| r.app == app.name)
        {
            continue; // the app's own service lists it in `hostnames`: that service keeps it
        }
        let default_host = format!("{}.{}", app.name, c.config.app_domain);
        match table.get(&default_host).cloned() {
            Some(mut route) => {
                route.hostname = d.hostname.to_string();
                table.insert(route.hostname.clone(), route);
            }
            None => {
                table.remove(d.hostname.as_str());
            }
        }
    }
    Ok(Json(RouteTable {
        seq,
        routes: table.into_values().collect(),
        ports: ports.into_values().collect(),
    }))
}
