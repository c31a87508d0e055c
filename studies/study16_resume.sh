#!/bin/bash
# Resume the issue-16 study on this machine, from the committed ledgers (docs/results.md, "Issue 16 study").
#
#   bash studies/study16_resume.sh              # set up what is missing, then start what is left, in the background
#   bash studies/study16_resume.sh --status     # only print how many runs each plan has left
#
# - The runs train from the pinned study code (a worktree at $PIN, its own venv), so that every run of the
#   study trains with the same code; the ledgers it appends to are this checkout's, studies/ledgers/.
# - Each plan with runs left gets one 1-thread worker; a plan alone gets both cores (2 workers). When both run
#   and the Shakespeare plan finishes first, a watcher stops the Python sweep with SIGINT (its runs checkpoint
#   after their current step) and starts it again with 2 workers, which resume those runs.
# - Every 15 minutes the ledgers are committed if they changed (a session may end without warning).
# Run folders and logs go to $RUNS (outside the repository).  Override the places with STUDY_CODE, STUDY_VENV
# and STUDY_RUNS.
set -euo pipefail

PIN=acd1a11
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
code=${STUDY_CODE:-/work/study-code}
venv=${STUDY_VENV:-/work/study-venv}
runs=${STUDY_RUNS:-/work/study_runs}
plans=(shakespeare python)

setup() {
    if [ ! -d "$code" ]; then
        git -C "$repo" worktree prune
        git -C "$repo" worktree add --detach "$code" "$PIN"
    fi
    if [ ! -x "$venv/bin/spannorm" ]; then
        python -m venv "$venv"
        "$venv/bin/pip" install -q -c "$code/constraints/cpu.txt" -e "$code"
    fi
    mkdir -p "$runs"
}

sweep_args() {  # the plan, its folder and its ledger
    echo "studies/study16_$1.yaml --out $runs/study16_$1 --ledger $repo/studies/ledgers/study16_$1.jsonl"
}

left() {  # how many runs the plan asks for now that have not finished (more may follow its LR search)
    (cd "$code" && PATH="$venv/bin:$PATH" spannorm sweep $(sweep_args "$1") --dry-run | grep -c " pending$" || true)
}

launch() {  # plan, workers: start a sweep; prints its pid
    # With job control (set -m) the sweep gets a process group of its own, which its workers share, and
    # SIGINT stays live: a script's background commands otherwise start with SIGINT ignored.
    local log="$runs/run_$1.log.$(date +%Y%m%d-%H%M)" pid
    cd "$code"
    set -m
    PATH="$venv/bin:$PATH" nohup spannorm sweep $(sweep_args "$1") --workers "$2" --threads 1 \
        > "$log" 2>&1 < /dev/null &
    pid=$!
    set +m
    cd - > /dev/null
    echo "$pid"
}

autocommit() {
    while true; do
        sleep 900
        if ! git -C "$repo" diff --quiet -- studies/ledgers; then
            git -C "$repo" commit -q -m "study16 ledgers: automatic checkpoint while the sweeps run" \
                -- studies/ledgers || true
        fi
    done
}

if [ "${1:-}" = "--status" ]; then
    setup >/dev/null
    for p in "${plans[@]}"; do echo "$p: $(left "$p") run(s) left now"; done
    exit 0
fi

setup
todo=()
for p in "${plans[@]}"; do
    n=$(left "$p")
    echo "$p: $n run(s) left now"
    if [ "$n" -gt 0 ]; then todo+=("$p"); fi
done
if [ ${#todo[@]} -eq 0 ]; then
    echo "every plan is finished: regenerate the report (docs/results.md)"
    exit 0
fi
nohup bash -c "$(declare -f autocommit); repo=$repo; autocommit" > "$runs/autocommit.log" 2>&1 < /dev/null &
if [ ${#todo[@]} -eq 1 ]; then
    echo "${todo[0]}: 2 workers, pid $(launch "${todo[0]}" 2)"
    exit 0
fi
first=$(launch shakespeare 1)
second=$(launch python 1)
echo "shakespeare: 1 worker, pid $first; python: 1 worker, pid $second"
alive() {  # a process that has not ended (an ended one nobody has reaped yet is a zombie: ended)
    [ -e "/proc/$1" ] && ! grep -q "^State:[[:space:]]*Z" "/proc/$1/status" 2>/dev/null
}
watch() {  # when the Shakespeare sweep ends with its plan finished, give the Python sweep both cores
    while alive "$first"; do sleep 60; done
    if [ "$(left shakespeare)" -eq 0 ] && alive "$second"; then
        kill -INT -- "-$second"
        while alive "$second"; do sleep 5; done
        echo "$(date): python: 2 workers, pid $(launch python 2)"
    fi
}
nohup bash -c "$(declare -f watch alive left launch sweep_args); first=$first; second=$second; code=$code; \
    venv=$venv; runs=$runs; repo=$repo; watch" > "$runs/watch.log" 2>&1 < /dev/null &
