//! The `gristmill` command-line tool.

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Fine-tune and run Llama-family models with QLoRA (NF4 base + LoRA), AdamW or GRIT, on one GPU
/// or on the CPU.
#[derive(Parser)]
#[command(name = "gristmill", version = gristmill::VERSION, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the reference path end to end on an embedded default (no files, no GPU needed):
    /// NF4 quantization, the bitsandbytes layout, a QLoRA fit with AdamW, K-FAC algebra.
    Selfcheck {
        /// Seed of the random weights and data.
        #[arg(long, default_value_t = 3407)]
        seed: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Selfcheck { seed } => selfcheck(seed),
    }
}

fn selfcheck(seed: u64) -> Result<()> {
    println!("gristmill {} selfcheck on {} (seed {seed})", gristmill::VERSION, gristmill::Device::Cpu);
    let checks = gristmill::selfcheck::run(seed);
    let width = checks.iter().map(|c| c.name.chars().count()).max().unwrap_or(0);
    for c in &checks {
        let status = if c.ok { "ok  " } else { "FAIL" };
        println!("{status} {:<width$}  {:>6.2}s  {}", c.name, c.seconds, c.measured);
        if !c.ok {
            println!("     {:<width$}           expected: {}", "", c.bound);
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    println!("{} passed, {} failed", checks.len() - failed, failed);
    if failed > 0 {
        anyhow::bail!("{failed} self-check(s) failed");
    }
    Ok(())
}
