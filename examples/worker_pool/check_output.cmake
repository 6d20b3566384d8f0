# cmake -DPROGRAM=path/to/worker_pool -P check_output.cmake — runs a short worker_pool on 1
# and on 3 threads; both must exit 0, print a line a round and the total, and print the same
# bytes (the output must not depend on scheduling). A bad argument must exit 2.
set(args --jobs 60 --block-size 2048 --rounds 2 --seed 7)
foreach(threads 1 3)
  execute_process(COMMAND ${PROGRAM} --threads ${threads} ${args}
    RESULT_VARIABLE rc OUTPUT_VARIABLE out_${threads} ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "worker_pool --threads ${threads} exited with ${rc}:\n${out_${threads}}${err}")
  endif()
endforeach()
if(NOT out_1 MATCHES "^round 1: 60 jobs, [0-9]+ records \\([0-9]+ rejected\\), [0-9]+ -> [0-9]+ bytes, crc32 0x[0-9a-f]+\nround 2: [^\n]+\ntotal: 2 rounds, 120 jobs, [^\n]+, every round trip verified\n$")
  message(FATAL_ERROR "unexpected output:\n${out_1}")
endif()
if(NOT out_1 STREQUAL out_3)
  message(FATAL_ERROR "output differs between 1 and 3 threads:\n${out_1}---\n${out_3}")
endif()

execute_process(COMMAND ${PROGRAM} --threads 0 RESULT_VARIABLE rc OUTPUT_QUIET ERROR_QUIET)
if(NOT rc EQUAL 2)
  message(FATAL_ERROR "worker_pool --threads 0 exited with ${rc}, expected 2")
endif()
message(STATUS "worker_pool:\n${out_1}")
