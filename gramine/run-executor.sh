#!/usr/bin/env bash
# Start the teeflow executor inside an SGX enclave with Gramine.
#
# Build first with `make SGX=1` in this folder. The command line (including
# --listen) is fixed in the signed manifest: this script takes no arguments;
# rebuild with `make SGX=1 LISTEN=HOST:PORT` to change the address (and give
# providers the new MRENCLAVE).
#
# Debugging without SGX hardware: `make` (no SGX=1) renders teeflow-executor.manifest,
# and `gramine-direct teeflow-executor` runs it as a plain process. That checks the
# file list and imports only; it has no enclave, so no quotes (--tee sgx cannot
# attest) and no _sgx_mrenclave key for the encrypted spill mount.
set -euo pipefail
cd "$(dirname "$0")"

name=teeflow-executor
if [ "$#" -gt 0 ]; then
    echo "error: arguments are fixed in the manifest; rebuild with make SGX=1 LISTEN=..." >&2
    exit 2
fi
for f in "$name.manifest.sgx" "$name.sig"; do
    if [ ! -f "$f" ]; then
        echo "error: $PWD/$f not found: build the enclave with 'make SGX=1' first." >&2
        exit 2
    fi
done
if ! command -v gramine-sgx >/dev/null 2>&1; then
    echo "error: gramine-sgx not found: install Gramine (see README.md)." >&2
    exit 2
fi
if [ -f "$name.mrenclave" ]; then
    echo "Starting $name, MRENCLAVE $(cat "$name.mrenclave")"
fi
echo "Register it from this host: teeflow register-executor HOST:PORT [--advertise HOST:PORT]"
# Host side of the encrypted mount (/tmp/teeflow-spill inside the enclave).
mkdir -p spill
exec gramine-sgx "$name"
