-- Runs several completions and claims in one script run: the calls that
-- mod.rs's batcher gathered while the previous run was in flight (group
-- commit). Each call is as atomic as its own script would be (Redis runs
-- the whole run alone) and gets its own reply; the calls share the clock
-- (NOW), the wake-ups (prelude: one message per job and run) and the
-- counters, which the run writes once at its end.
-- ARGV: 3 number of calls, then per call its op and its arguments:
--   OP_COMPLETE: COMPLETE_ARGS values (worker, task, epoch, result json, owner);
--   OP_CLAIM: CLAIM_ARGS values (worker, max, lease ttl ms, resident models
--     json, owner, caps json, ready LoRA sets json, waking);
--   OP_COMPLETE_CLAIM: both, the claim made only when the completion was accepted.
-- Returns one reply per call: complete's or claim's, {complete's, claim's or
-- {}} for OP_COMPLETE_CLAIM, or {'error', message} when the call raised an
-- error (its writes before the error stay, as with any script).
local args_of = {[OP_COMPLETE] = COMPLETE_ARGS, [OP_CLAIM] = CLAIM_ARGS,
  [OP_COMPLETE_CLAIM] = COMPLETE_ARGS + CLAIM_ARGS}

local function run_complete(at)
  return complete(ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2]), ARGV[at + 3], ARGV[at + 4])
end

local function run_claim(at)
  return claim(ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]), ARGV[at + 3],
    ARGV[at + 4], ARGV[at + 5], ARGV[at + 6], ARGV[at + 7] == '1')
end

local function run(op, at)
  if op == OP_COMPLETE then return run_complete(at) end
  if op == OP_CLAIM then return run_claim(at) end
  if op ~= OP_COMPLETE_CLAIM then error('unknown op ' .. tostring(op)) end
  local done = run_complete(at)
  local next_claim = {}
  if done[1] == 'ok' then next_claim = run_claim(at + COMPLETE_ARGS) end
  return {done, next_claim}
end

-- The run's counters are kept in Lua and written once, after the last call
-- (prelude: buffered, flush_counters).
buffered = true
local out = {}
local at = FIRST_CALL_ARG
for _ = 1, tonumber(ARGV[3]) do
  local op = ARGV[at]
  local ok, reply = pcall(run, op, at + 1)
  if not ok then
    if type(reply) == 'table' then reply = reply.err or cjson.encode(reply) end
    reply = {'error', tostring(reply)}
  end
  table.insert(out, reply)
  if args_of[op] == nil then break end
  at = at + 1 + args_of[op]
end
flush_counters()
return out
