#!/bin/sh
# The container's entry point: fetch the models into the data volume on first start, then become the bot.
#
# Arguments are i2p2i-bot's (--config PATH, --models smoke|default). Environment:
#   I2P2I_DOWNLOAD_MODELS  auto (default): fetch when these settings' models were not fetched yet;
#                          always: fetch on every start; never: do not fetch (weights baked in, or offline)
#   I2P2I_CONFIG           a settings file, passed as --config to the bot and to the download
#   I2P2I_MODELS           "smoke" or "default", passed as --models
#   I2P2I_ROLE             "bot" (default), or "worker": become `i2p2i worker`, a GPU worker for a bot with
#                          queue.backend = "redis" (it reads I2P2I_REDIS_URL)
#   I2P2I_DATA_DIR         the data folder (default /data); HF_HOME (default DATA_DIR/huggingface) holds weights
#   I2P2I_FETCH_RETRY_S    after a failed fetch, wait this long before exiting (default 60), so that a restart
#                          policy retries about once a minute; SIGTERM ends the wait at once
#   HF_HUB_OFFLINE         set: the models are not fetched. Unset (and TRANSFORMERS_OFFLINE unset): the bot
#                          starts with both set to 1. The bot reads the weights from HF_HOME alone either way.
# With "fetch-models" as the only argument it fetches (as if always) and exits: the image build uses that, and
# `docker compose run --rm bot fetch-models` fetches before the first start.
set -eu

say() {
    echo "entrypoint: $*" >&2
}

data_dir="${I2P2I_DATA_DIR:-/data}"
export HF_HOME="${HF_HOME:-$data_dir/huggingface}"
mode="${I2P2I_DOWNLOAD_MODELS:-auto}"
retry_s="${I2P2I_FETCH_RETRY_S:-60}"

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
case "$retry_s" in
    '' | *[!0-9]*)
        say "I2P2I_FETCH_RETRY_S must be a whole number of seconds (got '$retry_s')"
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
    # The Hugging Face libraries read TRANSFORMERS_OFFLINE when HF_HUB_OFFLINE is not set.
    offline="$(printf '%s' "${HF_HUB_OFFLINE:-${TRANSFORMERS_OFFLINE:-}}" | tr '[:upper:]' '[:lower:]')"
    case "$offline" in
        1 | true | yes)
            say "HF_HUB_OFFLINE is set, so the models are not fetched; the bot uses what the cache has"
            ;;
        *)
            say "fetching the models into $HF_HOME (about 9 GB the first time)"
            status=0
            i2p2i "$@" download-models || status=$?
            if [ "$status" -ne 0 ]; then
                say "fetching the models failed (exit $status); the bot is not started."
                say "  No internet here, and the weights are already in $HF_HOME or in the image?" \
                    "Set I2P2I_DOWNLOAD_MODELS=never."
                say "  Otherwise fetch them once with internet: docker compose run --rm bot fetch-models"
                if [ "$fetch_only" = false ] && [ "$retry_s" -gt 0 ]; then
                    # Docker's restart delay doubles up to a minute, but drops back to 0.1 s after any
                    # run of 10 s or more: a fetch that times out would otherwise be retried at once, forever.
                    # A second at a time: a trapped SIGTERM runs once the current sleep ends.
                    trap 'exit "$status"' TERM INT
                    say "exiting in $retry_s s (I2P2I_FETCH_RETRY_S); a restart policy then tries again"
                    waited=0
                    while [ "$waited" -lt "$retry_s" ]; do
                        sleep 1
                        waited=$((waited + 1))
                    done
                fi
                exit "$status"
            fi
            date -u +%Y-%m-%dT%H:%M:%SZ >"$marker"
            ;;
    esac
fi

if [ "$fetch_only" = true ]; then
    exit 0
fi
# The models are in place now (fetched, found by the marker, or declared so with never). The bot loads them
# from the cache alone and stops with one line if one is missing; offline mode also keeps the Hugging Face
# libraries from any request of their own.
if [ -z "${HF_HUB_OFFLINE:-}" ] && [ -z "${TRANSFORMERS_OFFLINE:-}" ]; then
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    say "starting the bot with HF_HUB_OFFLINE=1"
fi
# exec: the bot becomes this process, so it gets docker stop's SIGTERM and drains its queue.
if [ "${I2P2I_ROLE:-bot}" = worker ]; then
    exec i2p2i "$@" worker
fi
exec i2p2i-bot "$@"
