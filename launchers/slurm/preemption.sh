# shellcheck shell=bash
# Preemption and requeue for the SLURM templates (sourced by hvdscale-*.sbatch).
#
# Opt in when submitting (both are ordinary sbatch options; the SBATCH_* variables are their
# environment forms, so the templates need no editing):
#   sbatch --signal=B:USR1@120 --requeue ...   or   SBATCH_SIGNAL=B:USR1@120 SBATCH_REQUEUE=1
#   HVDSCALE_REQUEUE=1              requeue the job when training was stopped by a signal
#   HVDSCALE_REQUEUE_EXIT_CODE=75   the code the ranks exit with then (default 75, EX_TEMPFAIL)
#
# What happens:
# - USR1 or TERM reaching this batch shell (--signal=B:USR1@N sends USR1 N seconds before the
#   time limit; scancel --batch --signal=...) is passed on to srun, which passes it to every
#   task. The ranks agree on a step, write one checkpoint, write OUT/preempted.json and exit:
#   0, or HVDSCALE_REQUEUE_EXIT_CODE when requeueing was asked for.
# - With HVDSCALE_REQUEUE=1 the job is requeued (`scontrol requeue`) when srun ends with that
#   code or OUT/preempted.json appeared. srun reports the highest task code, and a task killed
#   by --kill-on-bad-exit while the others exit with 75 makes it 137, hence the file check.
#   OUT is --out if given, else runs/<job name>-<job id> (a requeued job keeps its id, so
#   every restart writes to the same directory).
# - A restarted job (SLURM_RESTART_COUNT >= 1: requeued by this script, by preemption or after
#   a node failure with --requeue) continues with --resume.

# preemption_train_args ARGS... -> TRAIN_ARGS (the hvdscale train arguments) and PREEMPT_OUT
preemption_train_args() {
    TRAIN_ARGS=("$@")
    PREEMPT_OUT=""
    local prev="" arg
    for arg in "$@"; do
        case $arg in --out=*) PREEMPT_OUT=${arg#--out=} ;; esac
        [ "$prev" = --out ] && PREEMPT_OUT=$arg
        prev=$arg
    done
    if [ "${HVDSCALE_REQUEUE:-0}" = 1 ]; then
        case ${HVDSCALE_REQUEUE_EXIT_CODE:=75} in
            '' | *[!0-9]* | 0) fail "HVDSCALE_REQUEUE_EXIT_CODE must be a code from 1 to 255, got '$HVDSCALE_REQUEUE_EXIT_CODE'" ;;
        esac
        [ "$HVDSCALE_REQUEUE_EXIT_CODE" -le 255 ] \
            || fail "HVDSCALE_REQUEUE_EXIT_CODE must be a code from 1 to 255, got '$HVDSCALE_REQUEUE_EXIT_CODE'"
        export HVDSCALE_REQUEUE_EXIT_CODE
        if [ -z "$PREEMPT_OUT" ]; then
            PREEMPT_OUT="runs/${SLURM_JOB_NAME:-hvdscale}-${SLURM_JOB_ID:-0}"
            TRAIN_ARGS+=(--out "$PREEMPT_OUT")
        fi
    fi
    if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ] 2>/dev/null; then
        TRAIN_ARGS+=(--resume)
    fi
}

# preemption_run COMMAND... : run COMMAND (which becomes srun), pass USR1/TERM on to it, then
# requeue the job if it was preempted and HVDSCALE_REQUEUE=1. Returns COMMAND's exit code, or
# 0 once the requeue is asked for.
preemption_run() {
    local marker="" child status
    if [ "${HVDSCALE_REQUEUE:-0}" = 1 ] && [ -n "$PREEMPT_OUT" ] && [ "${HVDSCALE_DRY_RUN:-0}" != 1 ]; then
        marker="$PREEMPT_OUT/preempted.json"
        rm -f "$marker"     # the previous attempt's, which this one resumes
    fi
    "$@" &
    child=$!
    # shellcheck disable=SC2064  # the child's pid is fixed now
    trap "echo 'hvdscale: USR1 received, passing it to srun' >&2; kill -s USR1 $child 2>/dev/null || true" USR1
    # shellcheck disable=SC2064
    trap "echo 'hvdscale: TERM received, passing it to srun' >&2; kill -s TERM $child 2>/dev/null || true" TERM
    # wait returns early (>128) when a trapped signal arrives; the child is still running then
    while kill -0 "$child" 2>/dev/null; do
        wait "$child" || true
    done
    status=0
    wait "$child" || status=$?
    trap - USR1 TERM
    if [ "${HVDSCALE_REQUEUE:-0}" = 1 ] \
        && { [ "$status" = "$HVDSCALE_REQUEUE_EXIT_CODE" ] || { [ -n "$marker" ] && [ -f "$marker" ]; }; }; then
        echo "hvdscale: training stopped at a checkpoint (exit $status); requeueing job ${SLURM_JOB_ID:-?}, it continues with --resume" >&2
        scontrol requeue "${SLURM_JOB_ID:?}" || {
            echo "hvdscale: scontrol requeue failed (submit with --requeue); resubmit with --resume" >&2
            return "$status"
        }
        return 0
    fi
    return "$status"
}
