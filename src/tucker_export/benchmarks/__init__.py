"""The benchmarks behind the README's figures, one module per question; ``bench/*.py`` run them.

Each measures its variants side by side in one run, prints ratios, and writes JSON with the
machine and the load verdict (``validation.machine.write_benchmark_json``). The library's own
measuring pieces are in ``validation`` (timing, memory, machine, the `tucker-export bench`
command); these modules only arrange them into the experiments the README reports.
"""
