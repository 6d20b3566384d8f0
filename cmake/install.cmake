# Installation, CMake package config (find_package(tramway)) and pkg-config file.
include(CMakePackageConfigHelpers)
# Include directories come from the target's INSTALL_INTERFACE (src/CMakeLists.txt); an
# `INCLUDES DESTINATION` here would list them twice.
install(TARGETS tramway tramway_trace EXPORT tramwayTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/tramway DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
# gdb settings for programs that use tramway (README, "Debugging with gdb").
install(FILES ${PROJECT_SOURCE_DIR}/share/tramway/tramway.gdb DESTINATION ${CMAKE_INSTALL_DATADIR}/tramway)
install(EXPORT tramwayTargets NAMESPACE tramway:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/tramway)
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/tramwayConfig.cmake.in
  ${PROJECT_BINARY_DIR}/tramwayConfig.cmake INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/tramway)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/tramwayConfigVersion.cmake COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/tramwayConfig.cmake ${PROJECT_BINARY_DIR}/tramwayConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/tramway)

# The pkg-config file is written at install time: `cmake --install --prefix P` (and CPack)
# change CMAKE_INSTALL_PREFIX only then, so a file configured now would name the wrong
# prefix. Not ${pcfiledir}-relative either: for a /usr install that gives
# -I/usr/lib/x86_64-linux-gnu/pkgconfig/../../../include, which pkg-config does not
# recognise as the system directory, and -I/usr/include breaks libstdc++'s #include_next.
foreach(kind LIBDIR INCLUDEDIR)
  if(IS_ABSOLUTE "${CMAKE_INSTALL_${kind}}")
    set(tramway_pc_${kind} "${CMAKE_INSTALL_${kind}}")
  else()
    set(tramway_pc_${kind} "\${prefix}/${CMAKE_INSTALL_${kind}}")
  endif()
endforeach()
install(CODE "
  set(TRAMWAY_PC_PREFIX \"\${CMAKE_INSTALL_PREFIX}\")
  set(TRAMWAY_PC_LIBDIR [[${tramway_pc_LIBDIR}]])
  set(TRAMWAY_PC_INCLUDEDIR [[${tramway_pc_INCLUDEDIR}]])
  set(PROJECT_VERSION [[${PROJECT_VERSION}]])
  configure_file([[${PROJECT_SOURCE_DIR}/cmake/tramway.pc.in]] [[${PROJECT_BINARY_DIR}/pkgconfig/tramway.pc]] @ONLY)
")
install(FILES ${PROJECT_BINARY_DIR}/pkgconfig/tramway.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
