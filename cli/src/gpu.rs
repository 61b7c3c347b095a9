//! `gristmill doctor` and `gristmill bench kernels`: the runtime gathers the reports
//! (`gristmill::doctor`), this prints them. Without a GPU both say so and succeed.

use anyhow::{Result, bail};
use clap::Subcommand;

/// What `gristmill bench` measures.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Every GPU kernel at a realistic size, after the device-copy bandwidth it is compared with.
    Kernels {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn doctor_cmd(json: bool) -> Result<()> {
    let r = gristmill::doctor::doctor();
    if json {
        println!("{}", serde_json::to_string_pretty(&r.to_json())?);
    } else {
        print!("{r}");
    }
    if !r.ok() {
        bail!("doctor: {} failure(s)", r.failures());
    }
    Ok(())
}

pub fn bench_cmd(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Kernels { json } => {
            let r = gristmill::doctor::bench_kernels();
            if json {
                println!("{}", serde_json::to_string_pretty(&r.to_json())?);
            } else {
                print!("{r}");
            }
            if !r.ok() {
                bail!("bench kernels: {} family(ies) failed", r.errors.len());
            }
            Ok(())
        }
    }
}
