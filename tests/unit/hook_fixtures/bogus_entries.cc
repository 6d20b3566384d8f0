// Fixture library for test_hook_discovery: besides its one patchable function, its
// __patchable_function_entries lists what a discarded function or a foreign tool can leave
// there: 0, the address of data, and the function again. Discovery must report one site.
extern "C" {
int real_function(int a) { return a + 3; }
int plain_data = 42;
}

asm(R"(
  .pushsection __patchable_function_entries,"awo",@progbits,real_function
  .balign 8
  .quad 0
  .quad plain_data
  .quad real_function - 8
  .popsection
)");
