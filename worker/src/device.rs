//! The `--device` value every command takes: which backend a rank computes on.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The Rust backend; ranks sum over a TCP ring.
    #[default]
    Cpu,
    /// The CUDA kernels; ranks sum with NCCL.
    Cuda,
}

impl Device {
    /// The name on the command line, in `run.json` and in the job a worker is sent.
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }

    /// The device a job names (the coordinator writes [`Device::name`]).
    pub fn parse(s: &str) -> anyhow::Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            o => anyhow::bail!("device '{o}': expected cpu or cuda"),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_serialise_as_the_command_line_writes_them() {
        for d in [Device::Cpu, Device::Cuda] {
            assert_eq!(Device::parse(d.name()).unwrap(), d);
            assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{}\"", d.name()));
            assert_eq!(<Device as clap::ValueEnum>::from_str(d.name(), false).unwrap(), d);
        }
        assert!(Device::parse("gpu").is_err());
    }
}
