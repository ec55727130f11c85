#!/bin/sh
# The container's entry point: fetch the models into the data volume on first start, then become the bot.
#
# Arguments are bot.py's (--config PATH, --models smoke|default). Environment:
#   I2P2I_DOWNLOAD_MODELS  auto (default): fetch when these settings' models were not fetched yet;
#                          always: fetch on every start; never: do not fetch (weights baked in, or offline)
#   I2P2I_CONFIG           a settings file, passed as --config to the bot and to the download
#   I2P2I_MODELS           "smoke" or "default", passed as --models
#   I2P2I_DATA_DIR         the data folder (default /data); HF_HOME (default DATA_DIR/huggingface) holds weights
# With "fetch-models" as the only argument it fetches (as if always) and exits: the image build uses that.
set -eu

say() {
    echo "entrypoint: $*" >&2
}

data_dir="${I2P2I_DATA_DIR:-/data}"
export HF_HOME="${HF_HOME:-$data_dir/huggingface}"
mode="${I2P2I_DOWNLOAD_MODELS:-auto}"
app_dir="$(cd "$(dirname "$0")/.." && pwd)"

fetch_only=false
if [ "$#" -eq 1 ] && [ "$1" = "fetch-models" ]; then
    fetch_only=true
    mode=always
    shift
fi
case "$mode" in
    auto | always | never) ;;
    *)
        say "I2P2I_DOWNLOAD_MODELS must be auto, always or never (got '$mode')"
        exit 2
        ;;
esac

if [ -n "${I2P2I_MODELS:-}" ]; then
    set -- --models "$I2P2I_MODELS" "$@"
fi
if [ -n "${I2P2I_CONFIG:-}" ]; then
    set -- --config "$I2P2I_CONFIG" "$@"
fi

if ! mkdir -p "$data_dir" "$HF_HOME" 2>/dev/null || [ ! -w "$data_dir" ] || [ ! -w "$HF_HOME" ]; then
    say "$data_dir is not a folder that user $(id -u) can write to; chown the volume to $(id -u):$(id -g)"
    exit 2
fi

# A heartbeat left by the last run (killed, or stopped) must not pass for this one's.
rm -f "$data_dir/health.json"

# The marker names the settings the models were fetched for: the bot's options and the config file's text.
config=""
previous=""
for arg in "$@"; do
    if [ "$previous" = "--config" ]; then
        config="$arg"
    fi
    case "$arg" in
        --config=*) config="${arg#--config=}" ;;
    esac
    previous="$arg"
done
key="$({
    printf '%s\n' "$@"
    if [ -n "$config" ] && [ -f "$config" ]; then cat "$config"; fi
} | sha256sum | cut -c1-16)"
marker="$HF_HOME/.i2p2i-models-$key"

fetch=false
case "$mode" in
    always) fetch=true ;;
    auto) [ -e "$marker" ] || fetch=true ;;
esac
if [ "$fetch" = true ]; then
    offline="$(printf '%s' "${HF_HUB_OFFLINE:-}" | tr '[:upper:]' '[:lower:]')"
    case "$offline" in
        1 | true | yes)
            say "HF_HUB_OFFLINE is set, so the models are not fetched; the bot uses what the cache has"
            ;;
        *)
            say "fetching the models into $HF_HOME (about 6 GB the first time)"
            status=0
            i2p2i "$@" download-models || status=$?
            if [ "$status" -ne 0 ]; then
                say "fetching the models failed (exit $status); the bot is not started"
                exit "$status"
            fi
            date -u +%Y-%m-%dT%H:%M:%SZ >"$marker"
            ;;
    esac
fi

if [ "$fetch_only" = true ]; then
    exit 0
fi
# exec: the bot becomes this process, so it gets docker stop's SIGTERM and drains its queue.
exec python "$app_dir/bot.py" "$@"
