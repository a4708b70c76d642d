#!/usr/bin/env bash
# GPU stages in the background, so that a call can return while they run on (the device keeps a
# process that started its own session until the machine goes back). Each run works in a private
# copy of the tree, which the next call's re-sync (it removes ignored paths not carried) can't touch.
#   bash benchmarks/gpu_bg.sh start NAME STAGE...   copy the tree to ~/bg/NAME, run gpu_session.sh there
#   bash benchmarks/gpu_bg.sh wait NAME SECONDS     until NAME has finished, at most SECONDS
#   bash benchmarks/gpu_bg.sh collect NAME...       each run's results so far, as $OUT/bg-NAME.tgz
set -uo pipefail
cmd=$1; shift
case $cmd in
  start)
    name=$1; shift
    d=$HOME/bg/$name r=$HOME/res/$name
    rm -rf "$d" "$r"; mkdir -p "$d" "$r"
    tar --exclude='./.gpu/parts*' --exclude=./.git -cf - . | tar -xf - -C "$d"
    (cd "$d" && OUT=$r setsid nohup bash -c "bash benchmarks/gpu_session.sh $*; echo \$? > $r/DONE" \
      > "$r/stdout.log" 2>&1 < /dev/null &)
    echo "started $name: $*" ;;
  wait)
    r=$HOME/res/$1
    for ((i = 0; i < $2; i += 5)); do [ -f "$r/DONE" ] && break; sleep 5; done
    [ -f "$r/DONE" ] && echo "$1 done" || echo "$1 still running" ;;
  collect)
    for name in "$@"; do
      [ -d "$HOME/res/$name" ] && tar -czf "$OUT/bg-$name.tgz" -C "$HOME/res" "$name"
      tail -n 4 "$HOME/res/$name/stdout.log" 2>/dev/null
    done ;;
  *) echo "unknown command $cmd"; exit 2 ;;
esac
