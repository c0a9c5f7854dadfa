"""The TEE executor: runs a task's computation over the parties' data inside the enclave."""
