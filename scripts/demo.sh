#!/usr/bin/env bash
# Run the example manifest against a local emulator: no account, no network.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export WAVESPEED_API_KEY=demo-key-not-secret
log=$(mktemp)
trap 'kill "$emu" 2>/dev/null || true; wait "$emu" 2>/dev/null || true; rm -f "$log"' EXIT

"$BIN/wsbatch" emulator --port 0 --latency 0.5,2.0 >"$log" 2>&1 &
emu=$!
for _ in $(seq 100); do
    grep -q "listening on" "$log" && break
    sleep 0.1
done
base=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$log" | head -n 1)
[ -n "$base" ] || { echo "the emulator did not start:"; cat "$log"; exit 1; }
echo "emulator: $base (a local stand-in for https://api.wavespeed.ai)"

status=0
"$BIN/wsbatch" run manifests/example.yaml --base-url "$base" --out output/example \
    --concurrency 4 || status=$?
echo
echo "outputs in output/example/:"
ls output/example | grep -E '\.(png|jpg|webp)$' | sed 's/^/  /'
"$BIN/wsbatch" report output/example | sed 's/^wsbatch: //'
echo "ledger: output/example/ledger.jsonl (run 'make demo' again to see it resume)"
exit "$status"
