//! Placement tests: the rules one by one, then the index against the plain scan.

use kiln_types::{AppId, HostId, MiB, MilliCpu};
use proptest::prelude::*;

use crate::*;

fn hid(n: u64) -> HostId {
    format!("host_{n:020}").parse().unwrap()
}

fn app(n: u64) -> AppId {
    format!("app_{n:020}").parse().unwrap()
}

fn host(n: u64, mem: u64) -> Host {
    Host {
        id: hid(n),
        region: Region::new("ams"),
        driver: Driver::new("firecracker"),
        state: HostState::Ready,
        memory: MiB(mem),
        cpu: MilliCpu(2000),
        disk: MiB(10_000),
    }
}

fn group(a: u64, p: &str) -> Group {
    Group {
        app: app(a),
        process: p.into(),
    }
}

fn req(mem: u64) -> Request {
    Request {
        group: group(1, "web"),
        region: Region::new("ams"),
        drivers: vec![],
        memory: MiB(mem),
        cpu: MilliCpu(1000),
        volumes: Volumes::None,
    }
}

fn usage(mem: u64) -> Usage {
    Usage {
        group: group(99, "other"),
        memory: MiB(mem),
        cpu: MilliCpu(0),
        disk: MiB(0),
    }
}

#[test]
fn memory_is_a_hard_cap_overhead_included() {
    // 1024 allocatable; 256 + 16 needed. Used 753 (737 + 16 overhead) leaves 271: one short.
    let mut inv = Inventory::new(vec![host(1, 1024)], Policy::default());
    inv.add_instance(&hid(1), &usage(737));
    assert_eq!(inv.used_memory(&hid(1)), Some(MiB(753)));
    let err = inv.place(&req(256)).unwrap_err();
    assert_eq!(err.count(Constraint::Memory), 1);
    let mut inv = Inventory::new(vec![host(1, 1024)], Policy::default());
    inv.add_instance(&hid(1), &usage(736));
    assert_eq!(inv.place(&req(256)), Ok(hid(1)));
    assert_eq!(inv.used_memory(&hid(1)), Some(MiB(1024)));
    assert!(
        inv.place(&req(0)).is_err(),
        "a full host takes nothing more"
    );
}

#[test]
fn cpu_is_oversubscribed_up_to_the_ratio() {
    let policy = Policy {
        cpu_oversubscription: 1.5,
    };
    let mut inv = Inventory::new(vec![host(1, 100_000)], policy);
    // 2000m × 1.5 = 3000m promised at most: three 1000m instances, not four.
    let batch = inv.place_many(&req(64), 4);
    assert_eq!(batch.hosts.len(), 3);
    let (missing, why) = batch.shortfall.unwrap();
    assert_eq!(missing, 1);
    assert_eq!(why.count(Constraint::Cpu), 1);
    assert_eq!(
        why.to_string(),
        "no host fits: 1 host with insufficient CPU"
    );
}

#[test]
fn only_ready_hosts_in_the_region_with_an_accepted_driver_get_work() {
    let mut down = host(1, 8192);
    down.state = HostState::Down;
    let mut draining = host(2, 8192);
    draining.state = HostState::Draining;
    let mut other_region = host(3, 8192);
    other_region.region = Region::new("syd");
    let mut qemu = host(4, 8192);
    qemu.driver = Driver::new("qemu");
    let small = host(5, 128);
    let good = host(6, 1024);
    let mut inv = Inventory::new(
        vec![down, draining, other_region, qemu, small, good],
        Policy::default(),
    );
    let mut r = req(256);
    r.drivers = vec![Driver::new("firecracker")];
    assert_eq!(inv.choose(&r), Ok(hid(6)));
    inv.set_state(&hid(6), HostState::Draining);
    let err = inv.choose(&r).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no host fits: 1 host down, 2 hosts draining, 1 host in another region, \
         1 host with a wrong driver, 1 host with insufficient memory"
    );
    assert_eq!(err.hosts(), 6);
    inv.set_state(&hid(1), HostState::Ready);
    assert_eq!(
        inv.choose(&r),
        Ok(hid(1)),
        "a host back up takes work again"
    );
    assert_eq!(
        Inventory::new(vec![], Policy::default())
            .choose(&r)
            .unwrap_err()
            .to_string(),
        "no hosts are registered"
    );
}

#[test]
fn an_existing_volume_pins_the_instance_to_its_host() {
    let mut inv = Inventory::new(vec![host(1, 8192), host(2, 1024)], Policy::default());
    let mut r = req(256);
    r.volumes = Volumes::Existing { host: hid(2) };
    assert_eq!(inv.place(&r), Ok(hid(2)));
    let mut big = req(900);
    big.volumes = Volumes::Existing { host: hid(2) };
    let err = inv.place(&big).unwrap_err();
    assert_eq!(err.count(Constraint::VolumeLocality), 1);
    assert_eq!(err.count(Constraint::Memory), 1);
    // A volume on a host that is gone: nothing can host it.
    big.volumes = Volumes::Existing { host: hid(7) };
    assert_eq!(
        inv.place(&big)
            .unwrap_err()
            .count(Constraint::VolumeLocality),
        2
    );
}

#[test]
fn a_draining_host_still_takes_what_its_volumes_pin_to_it() {
    let mut inv = Inventory::new(vec![host(1, 8192), host(2, 8192)], Policy::default());
    inv.set_state(&hid(2), HostState::Draining);
    let mut r = req(256);
    r.volumes = Volumes::Existing { host: hid(2) };
    assert_eq!(inv.place(&r), Ok(hid(2)));
    // Nothing else goes there, and a down host takes nothing.
    assert_eq!(inv.place(&req(256)), Ok(hid(1)));
    inv.set_state(&hid(2), HostState::Down);
    assert_eq!(inv.place(&r).unwrap_err().count(Constraint::HostDown), 1);
}

#[test]
fn a_new_volume_needs_volume_space() {
    let mut a = host(1, 8192);
    a.disk = MiB(500);
    let mut b = host(2, 4096);
    b.disk = MiB(2000);
    let mut inv = Inventory::new(vec![a, b], Policy::default());
    let mut r = req(256);
    r.volumes = Volumes::New { size: MiB(1000) };
    // Host 1 has more memory but too little disk.
    assert_eq!(inv.place(&r), Ok(hid(2)));
    assert_eq!(inv.place(&r), Ok(hid(2)));
    let err = inv.place(&r).unwrap_err();
    assert_eq!(err.count(Constraint::Disk), 2);
}

#[test]
fn spreads_a_group_before_filling_the_emptiest_host() {
    let mut inv = Inventory::new(
        vec![host(1, 64_000), host(2, 8192), host(3, 4096)],
        Policy::default(),
    );
    let batch = inv.place_many(&req(256), 4);
    // Most free memory first, but each host once before any twice.
    assert_eq!(batch.hosts, vec![hid(1), hid(2), hid(3), hid(1)]);
    assert!(batch.shortfall.is_none());
    // Another group is not pushed away by this one: it starts on the host with most memory.
    let mut other = req(256);
    other.group = group(2, "web");
    assert_eq!(inv.choose(&other), Ok(hid(1)));
    // Removing an instance makes room for the group there again.
    inv.remove_instance(
        &hid(2),
        &Usage {
            group: group(1, "web"),
            memory: MiB(256),
            cpu: MilliCpu(1000),
            disk: MiB(0),
        },
    );
    assert_eq!(inv.group_count(&hid(2), &group(1, "web")), 0);
    assert_eq!(inv.choose(&req(256)), Ok(hid(2)));
}

#[test]
fn places_a_count_in_every_region() {
    let mut hosts = Vec::new();
    for n in 0..6 {
        let mut h = host(n, 4096);
        h.region = Region::new(if n < 3 { "ams" } else { "syd" });
        hosts.push(h);
    }
    let mut inv = Inventory::new(hosts, Policy::default());
    let regions = [Region::new("ams"), Region::new("syd"), Region::new("nyc")];
    let batches = inv.place_per_region(&req(256), &regions, 3);
    let ids = |b: &Batch| {
        b.hosts
            .iter()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(ids(&batches[0]), [hid(0), hid(1), hid(2)].into());
    assert_eq!(ids(&batches[1]), [hid(3), hid(4), hid(5)].into());
    let (missing, why) = batches[2].shortfall.clone().unwrap();
    assert_eq!(missing, 3);
    assert_eq!(why.count(Constraint::Region), 6);
}

#[test]
fn explain_ranks_fitting_hosts_and_names_each_rejection() {
    let mut qemu = host(3, 8192);
    qemu.driver = Driver::new("qemu");
    let mut inv = Inventory::new(
        vec![host(1, 2048), host(2, 4096), qemu, host(4, 100)],
        Policy::default(),
    );
    let mut r = req(256);
    r.drivers = vec![Driver::new("firecracker")];
    assert_eq!(inv.place(&r), Ok(hid(2)));
    let ex = inv.explain(&r);
    assert_eq!(ex.outcome, Ok(hid(1)));
    assert_eq!(ex.outcome, inv.choose(&r));
    let text = ex.to_string();
    let expected = format!(
        "request: {app}/web region=ams drivers=firecracker memory=256 MiB cpu=1000m\n\
         chosen: {h1}\n\
         {h1} ams firecracker ready free=2048 MiB rank 1: 0 of the group here, 1776 MiB free after\n\
         {h2} ams firecracker ready free=3824 MiB rank 2: 1 of the group here, 3552 MiB free after\n\
         {h3} ams qemu ready free=8192 MiB rejected by driver: host runs qemu, workload accepts firecracker\n\
         {h4} ams firecracker ready free=100 MiB rejected by memory: needs 272 MiB with overhead, 100 MiB free\n",
        app = app(1),
        h1 = hid(1),
        h2 = hid(2),
        h3 = hid(3),
        h4 = hid(4),
    );
    assert_eq!(text, expected);
}

// The index must pick exactly what the plain scan (explain) ranks first, and never overcommit.

fn arb_host(n: u64) -> impl Strategy<Value = Host> {
    (
        0..2u8,
        0..2u8,
        0..6u8,
        prop::sample::select(vec![512u64, 1024, 2048, 4096]),
        prop::sample::select(vec![1000u32, 2000, 4000]),
        0..3000u64,
    )
        .prop_map(move |(region, driver, state, memory, cpu, disk)| Host {
            id: hid(n),
            region: Region::new(["ams", "syd", "nyc"][region as usize]),
            driver: Driver::new(["firecracker", "qemu", "runc"][driver as usize]),
            state: match state {
                0 => HostState::Down,
                1 => HostState::Draining,
                _ => HostState::Ready,
            },
            memory: MiB(memory),
            cpu: MilliCpu(cpu),
            disk: MiB(disk),
        })
}

fn arb_request() -> impl Strategy<Value = Request> {
    (
        0..2u64,
        0..3u8,
        prop::collection::vec(0..3u8, 0..3),
        prop::sample::select(vec![64u64, 128, 256, 512, 1024]),
        prop::sample::select(vec![250u32, 1000, 2000]),
        0..4u8,
        0..12u64,
    )
        .prop_map(|(g, region, drivers, memory, cpu, vol, pin)| Request {
            group: group(g, "web"),
            region: Region::new(["ams", "syd", "nyc"][region as usize]),
            drivers: drivers
                .into_iter()
                .map(|d| Driver::new(["firecracker", "qemu", "runc"][d as usize]))
                .collect(),
            memory: MiB(memory),
            cpu: MilliCpu(cpu),
            volumes: match vol {
                0 => Volumes::Existing { host: hid(pin) },
                1 => Volumes::New {
                    size: MiB(pin * 100),
                },
                _ => Volumes::None,
            },
        })
}

fn arb_case() -> impl Strategy<Value = (Vec<Host>, Vec<Request>, Vec<(u64, HostState)>)> {
    (1..16u64).prop_flat_map(|n| {
        (
            (0..n).map(arb_host).collect::<Vec<_>>(),
            prop::collection::vec(arb_request(), 1..80),
            prop::collection::vec(
                (
                    0..n,
                    prop::sample::select(vec![
                        HostState::Ready,
                        HostState::Draining,
                        HostState::Down,
                    ]),
                ),
                0..4,
            ),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn index_agrees_with_the_scan_and_never_overcommits((hosts, reqs, flips) in arb_case()) {
        let mut inv = Inventory::new(hosts.clone(), Policy { cpu_oversubscription: 2.0 });
        let mut placed: Vec<(HostId, Usage)> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            if let Some((h, s)) = flips.get(i % 7) {
                inv.set_state(&hid(*h), *s);
            }
            // Now and then an instance goes away.
            if i % 5 == 4 && !placed.is_empty() {
                let (h, u) = placed.remove(i % placed.len());
                let before = inv.group_count(&h, &u.group);
                prop_assert!(inv.remove_instance(&h, &u));
                prop_assert_eq!(inv.group_count(&h, &u.group), before - 1);
            }
            let ex = inv.explain(r);
            let chosen = inv.choose(r);
            prop_assert_eq!(&chosen, &ex.outcome);
            let placed_on = inv.place(r);
            prop_assert_eq!(&placed_on, &chosen);
            if let Ok(h) = placed_on {
                let spec = hosts.iter().find(|x| x.id == h).unwrap();
                prop_assert!(inv.used_memory(&h).unwrap() <= spec.memory);
                placed.push((h, Usage {
                    group: r.group.clone(),
                    memory: r.memory,
                    cpu: r.cpu,
                    disk: MiB(r.new_disk()),
                }));
            }
        }
    }
}
