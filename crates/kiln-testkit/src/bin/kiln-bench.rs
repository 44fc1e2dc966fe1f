//! `kiln-bench NAME`: runs one benchmark of `kiln_testkit::bench` (see `./scripts/bench`).

use anyhow::{bail, Result};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let name = std::env::args().nth(1).unwrap_or_default();
    match name.as_str() {
        "api" => kiln_testkit::bench::api::run().await,
        "deploy" => kiln_testkit::bench::deploy::run().await,
        "edge" => kiln_testkit::bench::edge::run().await,
        "scheduler" => kiln_testkit::bench::scheduler::run().await,
        "store" => kiln_testkit::bench::store::run().await,
        other => {
            bail!("unknown benchmark {other:?}; available: api, deploy, edge, scheduler, store")
        }
    }
}
