#!/bin/sh
# Builds the C example plugin next to its manifest, where plugin-host looks first:
#   sh plugins/c-echo/build.sh
# Uses $CC (default: cc) and plugin-api/include from this repository. The tests build their
# own copy (tests/build.rs); this is for the demo, `plugin-host check plugins` and trying
# the plugin by hand.
set -eu
dir=$(cd "$(dirname "$0")" && pwd)
include="$dir/../../plugin-api/include"
case "$(uname -s)" in
    Darwin) library="$dir/libc_echo.dylib" ;;
    *) library="$dir/libc_echo.so" ;;
esac
${CC:-cc} -shared -fPIC -O2 -Wall -Werror -I "$include" -o "$library" "$dir/echo.c"
echo "built $library"
