# Sourced by GPU call scripts (session 16 on): `run NAME LIMIT_S CMD...` runs CMD under `timeout LIMIT_S`, its output
# in $L/NAME.log, prints "== NAME rc=.. N s" and the log's lines matching $RUN_SHOW (the last $RUN_TAIL of them, cut
# at $RUN_CUT characters). A run that would end past $RUN_BUDGET seconds of the script is skipped (a device call
# may run 600 s).
: "${L:?set L, the log folder}" "${RUN_SHOW:=^batch|Error|error:}" "${RUN_TAIL:=4}" "${RUN_CUT:=230}" "${RUN_BUDGET:=590}"
mkdir -p "$L"
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt "$RUN_BUDGET" ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "$RUN_SHOW" "$L/$name.log" | cut -c1-"$RUN_CUT" | tail -"$RUN_TAIL"; }
# `h100_pair_or_stop`: print the cards; on H200s exit 3 unless ANY_CARD=1 (calls meant for an H100 pair, session 17).
h100_pair_or_stop() { local card; card=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee /dev/stderr | head -1)
        case "$card" in *H200*) [ "${ANY_CARD:-0}" = 1 ] || { echo "H200 pair, not run"; exit 3; } ;; esac; }
