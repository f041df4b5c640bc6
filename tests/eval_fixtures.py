"""Hand-written MultiPL-E completions (right, wrong, leaving early) for two problems in every language."""

SOLUTIONS = {  # hand-written: MultiPL-E data has no reference solutions
    "cpp": {
        "HumanEval_0_has_close_elements": "    for (size_t i = 0; i < numbers.size(); i++)\n"
        "        for (size_t j = i + 1; j < numbers.size(); j++)\n"
        "            if (std::abs(numbers[i] - numbers[j]) < threshold) return true;\n    return false;\n",
        "HumanEval_13_greatest_common_divisor": "    while (b) { long t = a % b; a = b; b = t; }\n    return a;\n",
    },
    "java": {
        "HumanEval_0_has_close_elements": "        for (int i = 0; i < numbers.size(); i++)\n"
        "            for (int j = i + 1; j < numbers.size(); j++)\n"
        "                if (Math.abs(numbers.get(i) - numbers.get(j)) < threshold) return true;\n"
        "        return false;\n",
        "HumanEval_13_greatest_common_divisor": "        while (b != 0) { long t = a % b; a = b; b = t; }\n"
        "        return a;\n",
    },
    "js": {
        "HumanEval_0_has_close_elements": "  for (let i = 0; i < numbers.length; i++)\n"
        "    for (let j = i + 1; j < numbers.length; j++)\n"
        "      if (Math.abs(numbers[i] - numbers[j]) < threshold) return true;\n  return false;\n}\n",
        "HumanEval_13_greatest_common_divisor": "  while (b) { [a, b] = [b, a % b]; }\n  return a;\n}\n",
    },
    "php": {
        "HumanEval_0_has_close_elements": "    for ($i = 0; $i < count($numbers); $i++)\n"
        "        for ($j = $i + 1; $j < count($numbers); $j++)\n"
        "            if (abs($numbers[$i] - $numbers[$j]) < $threshold) return true;\n    return false;\n}\n",
        "HumanEval_13_greatest_common_divisor": "    while ($b) { $t = $a % $b; $a = $b; $b = $t; }\n"
        "    return $a;\n}\n",
    },
    "cs": {
        "HumanEval_0_has_close_elements": "    public static bool HasCloseElements("
        "List<float> numbers, float threshold) {\n"
        "        for (int i = 0; i < numbers.Count; i++)\n            for (int j = i + 1; j < numbers.Count; j++)\n"
        "                if (Math.Abs(numbers[i] - numbers[j]) < threshold) return true;\n        return false;\n",
        "HumanEval_13_greatest_common_divisor": "    public static long GreatestCommonDivisor(long a, long b) {\n"
        "        while (b != 0) { long t = a % b; a = b; b = t; }\n        return a;\n",
    },
    "sh": {
        "HumanEval_0_has_close_elements": "    local -a xs=($1)\n    local n=${#xs[@]} i j\n"
        "    for ((i = 0; i < n; i++)); do\n"
        "        for ((j = i + 1; j < n; j++)); do\n"
        '            if awk -v a="${xs[i]}" -v b="${xs[j]}" -v t="$2" '
        "'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d < t) }'; then\n"
        "                echo true; return\n            fi\n        done\n    done\n    echo false\n",
        "HumanEval_13_greatest_common_divisor": "    local a=$1 b=$2 t\n"
        "    while (( b )); do t=$((a % b)); a=$b; b=$t; done\n    echo $a\n",
    },
    "go": {
        "HumanEval_0_has_close_elements": "    for i := 0; i < len(numbers); i++ {\n"
        "        for j := i + 1; j < len(numbers); j++ {\n"
        "            d := numbers[i] - numbers[j]\n            if d < 0 {\n                d = -d\n            }\n"
        "            if d < threshold {\n                return true\n            }\n        }\n    }\n"
        "    return false\n}\n",
        "HumanEval_13_greatest_common_divisor": "    for b != 0 {\n        a, b = b, a%b\n    }\n    return a\n}\n",
    },
    "rs": {
        "HumanEval_0_has_close_elements": "    for i in 0..numbers.len() {\n        for j in (i + 1)..numbers.len() {\n"
        "            if (numbers[i] - numbers[j]).abs() < threshold {\n"
        "                return true;\n            }\n"
        "        }\n    }\n    false\n",
        "HumanEval_13_greatest_common_divisor": "    let (mut a, mut b) = (a, b);\n    while b != 0 {\n"
        "        let t = a % b;\n        a = b;\n        b = t;\n"
        "    }\n    a\n",
    },
}
SOLUTIONS["ts"] = SOLUTIONS["js"]
# compiles (or parses) but is wrong: gcd(a, b) = 1
WRONG = {
    "cpp": "    return 1;\n",
    "java": "        return 1;\n",
    "js": "  return 1;\n}\n",
    "ts": "  return 1;\n}\n",
    "php": "    return 1;\n}\n",
    "sh": "    echo 1\n",
    "cs": "    public static long GreatestCommonDivisor(long a, long b) {\n        return 1;\n",
    "go": "    return 1\n}\n",
    "rs": "    1\n",
}
# leaves with success before the tests can fail
EARLY_EXIT = {
    "cpp": "    std::exit(0);\n",
    "java": "        System.exit(0); return 0;\n",
    "js": "  process.exit(0);\n}\n",
    "ts": "  require('process').exit(0);\n  return 0;\n}\n",
    "php": "    exit(0);\n}\n",
    "sh": "    exit 0\n",
    "cs": "    public static long GreatestCommonDivisor(long a, long b) {\n"
    "        System.Environment.Exit(0); return 0;\n",
    "go": '    panic("no Go without an import of os")\n}\n',
    "rs": "    std::process::exit(0)\n",
}
