# Writes tramway(1) with help2man: the command's --help, then a section with each subcommand's
# --help. Run at build time by tools/tramway/CMakeLists.txt (cmake -P).
get_filename_component(dir ${OUT} DIRECTORY)
file(MAKE_DIRECTORY ${dir})
set(include ${OUT}.include)
file(WRITE ${include} "[SUBCOMMANDS]\n")
foreach(sub list record run live report)
  execute_process(COMMAND ${TRAMWAY} ${sub} --help OUTPUT_VARIABLE help RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "`tramway ${sub} --help` failed (${rc})")
  endif()
  string(REPLACE "\\" "\\e" help "${help}")
  file(APPEND ${include} ".SS tramway ${sub}\n.nf\n${help}.fi\n")
endforeach()
file(APPEND ${include} "[SEE ALSO]\nThe README of the tramway sources, and uftrace(1), perf(1).\n")
execute_process(COMMAND ${HELP2MAN} --no-info --no-discard-stderr --version-string=${VERSION}
                        "--name=trace and hook the functions of running programs" --include=${include}
                        --output=${OUT} ${TRAMWAY}
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "help2man failed (${rc})")
endif()
