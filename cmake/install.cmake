# Installation, CMake package config (find_package(tramway)) and pkg-config file.
include(CMakePackageConfigHelpers)
install(TARGETS tramway EXPORT tramwayTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/tramway DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT tramwayTargets NAMESPACE tramway:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/tramway)
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/tramwayConfig.cmake.in
  ${PROJECT_BINARY_DIR}/tramwayConfig.cmake INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/tramway)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/tramwayConfigVersion.cmake COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/tramwayConfig.cmake ${PROJECT_BINARY_DIR}/tramwayConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/tramway)
configure_file(${PROJECT_SOURCE_DIR}/cmake/tramway.pc.in ${PROJECT_BINARY_DIR}/tramway.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/tramway.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
