"""GPU benchmarks (make bench): throughput, memory and MFU of every task's reference configuration."""
