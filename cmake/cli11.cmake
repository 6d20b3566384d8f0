# tramway_link_cli11(target): the command-line programs' CLI11. Debian's libcli11-dev ships a
# CMake config (CLI11::CLI11); fall back to its header where a system lacks the config.
find_package(CLI11 CONFIG QUIET)
function(tramway_link_cli11 target)
  if(TARGET CLI11::CLI11)
    target_link_libraries(${target} PRIVATE CLI11::CLI11)
  else()
    find_path(TRAMWAY_CLI11_INCLUDE_DIR CLI/CLI.hpp REQUIRED
      DOC "CLI11's header directory (Debian: libcli11-dev)")
    target_include_directories(${target} SYSTEM PRIVATE ${TRAMWAY_CLI11_INCLUDE_DIR})
  endif()
endfunction()
