#!/usr/bin/env bash
# shellcheck disable=SC2016 # single-quoted $1 below belongs to the generated code
# embed.sh INSTALL_SH TEMPLATE_DIR > OUT: prints install.sh with every template of
# TEMPLATE_DIR embedded (build.sh makes bin/install.sh with it), so the curl-piped script
# needs no second download and installer/ stays the only place the templates are written.
# Each template becomes a quoted heredoc (no expansion) inside embedded_template().
set -euo pipefail
script=$1
dir=$2
marker='embedded_template() { return 1; }  # @@EMBEDDED_TEMPLATES@@ (build.sh replaces this line)'
delimiter=TECHULUS_TEMPLATE_END

grep -qxF "$marker" "$script" || { echo "embed.sh: $script has no line '$marker'" >&2; exit 1; }

embedded() {
  echo "# Templates embedded by build.sh from installer/ (do not edit here)."
  echo 'embedded_template() {'
  echo '  case "$1" in'
  local file name
  for file in "$dir"/*; do
    name=$(basename "$file")
    case "$name" in
      embed.sh | zipapp-constraints.txt | *.md) continue ;;
    esac
    [[ $name =~ ^[A-Za-z0-9._-]+$ ]] || { echo "embed.sh: unexpected template name '$name'" >&2; exit 1; }
    if grep -qxF "$delimiter" "$file"; then
      echo "embed.sh: $file contains the line $delimiter" >&2
      exit 1
    fi
    [ -z "$(tail -c 1 "$file")" ] || { echo "embed.sh: $file does not end with a newline" >&2; exit 1; }
    echo "    $name)"
    echo "      cat <<'$delimiter'"
    cat "$file"
    echo "$delimiter"
    echo '      ;;'
  done
  echo '    *) return 1 ;;'
  echo '  esac'
  echo '}'
}

block=$(embedded)
while IFS= read -r line || [ -n "$line" ]; do
  if [ "$line" = "$marker" ]; then
    printf '%s\n' "$block"
  else
    printf '%s\n' "$line"
  fi
done <"$script"
