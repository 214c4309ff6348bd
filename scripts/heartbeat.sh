# Sourced by scripts/build-cluster (which defines log): `heartbeat` reads
# `go build -v` output on stdin and turns minutes of compiling into progress lines on stderr.
# shellcheck shell=bash

# go build -v names each package it compiles (thousands, cold): a line every
# 100 packages and one every 30 s of silence (the final links) say it is alive.
heartbeat() {
    local count=0 last=$SECONDS line
    while true; do
        if IFS= read -r -t 30 line; then
            if [[ $line == *' '* ]]; then
                log "  $line"  # not a package path: an error or warning, shown whole
            else
                count=$((count + 1))
                (( count % 100 == 0 )) && log "  ... $count packages compiled ($line)"
            fi
            last=$SECONDS
        else
            (( $? > 128 )) || break  # end of input, not a timeout
            log "  ... still building ($count packages compiled, $((SECONDS - last))s since the last)"
        fi
    done
    log "  $count packages compiled"
}
