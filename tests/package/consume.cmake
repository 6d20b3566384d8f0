# cmake -P script behind the "package" test: installs the built tramway into a fresh prefix,
# then builds and runs tests/package/consumer against it twice — through
# find_package(tramway) and through pkg-config. Nothing may come from the build tree.
#
# Inputs (-D): BUILD_DIR, CONSUMER_DIR, WORK_DIR, LIBDIR (CMAKE_INSTALL_LIBDIR), GENERATOR,
# MAKE_PROGRAM, CXX, PKG_CONFIG.
cmake_minimum_required(VERSION 3.25)

foreach(v BUILD_DIR CONSUMER_DIR WORK_DIR LIBDIR GENERATOR CXX PKG_CONFIG)
  if(NOT DEFINED ${v} OR "${${v}}" STREQUAL "")
    message(FATAL_ERROR "consume.cmake: -D${v}=... is required")
  endif()
endforeach()

set(prefix "${WORK_DIR}/prefix")
set(libdir "${prefix}/${LIBDIR}")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

# Runs a command; on failure prints what it was and its output, and fails the test.
function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    list(JOIN ARGN " " cmd)
    message(FATAL_ERROR "package test: ${what} failed (${rc}):\n  ${cmd}\n${out}")
  endif()
  set(run_output "${out}" PARENT_SCOPE)
endfunction()

# 1. Install.
run("cmake --install" "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}")
foreach(f include/tramway/static_key.h include/tramway/static_call.h ${LIBDIR}/cmake/tramway/tramwayConfig.cmake
          ${LIBDIR}/pkgconfig/tramway.pc)
  if(NOT EXISTS "${prefix}/${f}")
    message(FATAL_ERROR "package test: the install did not produce ${f}")
  endif()
endforeach()
# Zydis is a private dependency of the shared library: consumers must not need it. (CMake
# does record it in IMPORTED_LINK_DEPENDENT_LIBRARIES, a hint for -rpath-link that is
# ignored when the consumer has no such target; the consumer below is configured with
# find_package(zydis) disabled to prove it.)
file(GLOB package_files "${libdir}/cmake/tramway/*.cmake" "${libdir}/pkgconfig/tramway.pc")
foreach(f ${package_files})
  file(STRINGS "${f}" hits REGEX "[Zz]ydis")
  list(FILTER hits EXCLUDE REGEX "^[ \t]*#|IMPORTED_LINK_DEPENDENT_LIBRARIES")
  if(hits)
    message(FATAL_ERROR "package test: ${f} makes consumers depend on Zydis, a private dependency:\n${hits}")
  endif()
endforeach()

# 2. find_package(tramway). Zydis and the package registry are disabled so that neither
# the system nor the build tree can fill a gap in the installed package.
set(build "${WORK_DIR}/cmake-build")
set(configure_args -S "${CONSUMER_DIR}" -B "${build}" -G "${GENERATOR}" "-DCMAKE_CXX_COMPILER=${CXX}"
    -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_PREFIX_PATH=${prefix}"
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF -DCMAKE_DISABLE_FIND_PACKAGE_zydis=ON)
if(MAKE_PROGRAM)
  list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
run("configuring the consumer" "${CMAKE_COMMAND}" --no-warn-unused-cli ${configure_args})
file(STRINGS "${build}/CMakeCache.txt" found REGEX "^tramway_DIR:")
if(NOT found STREQUAL "tramway_DIR:PATH=${libdir}/cmake/tramway")
  message(FATAL_ERROR "package test: the consumer found tramway elsewhere: ${found}")
endif()
run("building the consumer" "${CMAKE_COMMAND}" --build "${build}")
# The build tree RPATH CMake gives it must point at the installed library.
run("ldd" ldd "${build}/consumer")
if(NOT run_output MATCHES "libtramway\\.so\\.[0-9]+ => ${libdir}/libtramway")
  message(FATAL_ERROR "package test: the consumer does not load the installed libtramway:\n${run_output}")
endif()
run("running the consumer (find_package)" "${build}/consumer")
string(STRIP "${run_output}" run_output)
message(STATUS "find_package: ${run_output}")

# 3. pkg-config, with the same main.cc and the same compiler.
set(ENV{PKG_CONFIG_PATH} "${libdir}/pkgconfig")
run("pkg-config" "${PKG_CONFIG}" --cflags --libs tramway)
string(STRIP "${run_output}" pc_flags)
message(STATUS "pkg-config --cflags --libs tramway: ${pc_flags}")
separate_arguments(pc_flags UNIX_COMMAND "${pc_flags}")
run("compiling the consumer with pkg-config's flags"
    "${CXX}" -Wall -Wextra -Werror "${CONSUMER_DIR}/main.cc" ${pc_flags} -o "${WORK_DIR}/consumer-pc")
run("running the consumer (pkg-config)" "${CMAKE_COMMAND}" -E env "LD_LIBRARY_PATH=${libdir}" "${WORK_DIR}/consumer-pc")
string(STRIP "${run_output}" run_output)
message(STATUS "pkg-config: ${run_output}")
