# `cpack -G DEB` in a build directory: a Debian package of the libraries, headers, CMake and
# pkg-config files, the agent, the `tramway` command and its man page, installed under /usr.
# tests/package checks that it unpacks and that `tramway record` works from it.
set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME tramway)
set(CPACK_PACKAGE_VENDOR "the tramway developers")
set(CPACK_PACKAGE_CONTACT "tramway developers <tramway@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "function hooks, live patching and tracing for running programs")
set(CPACK_PACKAGE_DESCRIPTION
    "tramway brings the Linux kernel's live-patching machinery to user space: ftrace-style function\n hooks on any function of a running multithreaded program, static keys and calls, and a tracer\n (tramway record, live, report) with Perfetto, pprof and Chrome outputs.")
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION devel)
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)  # dpkg-shlibdeps: libzydis, libelf, libstdc++, ...
set(CPACK_DEBIAN_PACKAGE_GENERATE_SHLIBS ON)
set(CPACK_STRIP_FILES OFF)
include(CPack)
