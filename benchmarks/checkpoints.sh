# Sourced by the benchmark scripts: quantize each preset of PRESETS once into $CK and list the models.
#   PRESETS=("name|recipe|extra quantize flags" ...); CK=cache dir; BASE=unquantized model dir; CLI=the CLI
#   make_checkpoints   -> MODELS=("bf16=$BASE" "name=$CK/smollm2-name" ...)
make_checkpoints() {
  MODELS=("bf16=$BASE")
  local p name recipe flags dir
  for p in "${PRESETS[@]}"; do
    IFS='|' read -r name recipe flags <<<"$p"
    dir=$CK/smollm2-$name
    if [ ! -f "$dir/config.json" ]; then
      # shellcheck disable=SC2086
      $CLI quantize "$BASE" --recipe "$recipe" $flags --out "$dir"
    fi
    MODELS+=("$name=$dir")
  done
}
