# shellcheck shell=bash
# Helpers shared by the launchers (sourced, never run): usage errors, and the one place that
# decides whether a command runs or, under --dry-run, is only printed.
#
# Dry-run convention: every command a launcher would run is printed on stdout as one line,
# "[dry-run] " followed by the command in shell quoting (Python's shlex.split reads it back into
# the same words); nothing is run. Notes go to stderr, so stdout holds only commands.

DRY_RUN=0
DRY_RUN_PREFIX="[dry-run] "

note() { echo "$(basename "$0"): $1" >&2; }

# A mistake on the command line: the message names the flag; exit status 2.
die_usage() {
  note "$1 (see --help)"
  exit 2
}

die() {
  note "$1"
  exit 1
}

# The top comment block of the calling script (after the shebang) is its usage text.
usage() {
  local line
  while IFS= read -r line; do
    [[ "$line" == "#!"* ]] && continue
    [[ "$line" == "#"* ]] || break
    line="${line#"#"}"
    echo "${line# }"
  done <"$0"
}

# The VALUE of --flag=VALUE; a flag given without "=VALUE" is refused, naming it.
flag_value() {
  [[ "$1" == *=* ]] || die_usage "${1} needs a value: ${1}=VALUE"
  printf '%s' "${1#*=}"
}

require_flag() {
  [[ -n "$2" ]] || die_usage "missing required flag $1=..."
}

# The arguments as one line that a shell reads back into the same words: plain words stay as
# they are, anything else is single-quoted (a quote inside becomes '\'').
shell_words() {
  local word line="" escaped_quote="'\\''"
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      line+=" $word"
    else
      line+=" '${word//\'/$escaped_quote}'"
    fi
  done
  printf '%s\n' "${line# }"
}

# Run a command, or print it under --dry-run.
run() {
  if ((DRY_RUN)); then
    printf '%s%s\n' "$DRY_RUN_PREFIX" "$(shell_words "$@")"
  else
    note "running: $(shell_words "$@")"
    "$@"
  fi
}

# A query whose answer decides whether a step is needed (does the TPU exist?): its status
# when run for real; under --dry-run it is printed and answers "no", so every step shows.
probe() {
  if ((DRY_RUN)); then
    printf '%s%s\n' "$DRY_RUN_PREFIX" "$(shell_words "$@")"
    return 1
  fi
  "$@" >/dev/null 2>&1
}

# Everything after "--" goes to the program; launching with nothing there is a mistake.
require_program_args() {
  (($# > 0)) ||
    die_usage "nothing after --: pass the program's flags, e.g. -- --config=configs/clip.py:demo"
}
