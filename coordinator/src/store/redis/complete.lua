-- Accepts a result if the worker holds the lease under the epoch; a replay of
-- the same accepted completion is accepted again; anything else is stale.
-- Returns {'ok', finished job state or '', job}, {'stale', reason}, {'bound'} or {'missing'}.
-- Called by dispatch.lua, alone or with other calls in one run.
local function complete(worker, tid, epoch, result_json, owner)
  -- The worker's owner and class in one read.
  local w = redis.call('HMGET', k('worker', worker), 'owner', 'class')
  if not owner_allows(w[1], owner) then return {'bound'} end
  local t = k('task', tid)
  -- Whether the task exists and the worker holds it, and what a completion
  -- writes, in one read.
  local h = redis.call('HMGET', t, 'state', 'epoch', 'holder', 'steps', 'job', 'index', 'file', 'rhash')
  if not h[1] then return {'missing'} end
  if held_by(h, worker, epoch) then
    -- The store records the worker's class with the result.
    local result = cjson.decode(result_json)
    result.class = w[2] or ''
    redis.call('HSET', t, 'result', cjson.encode(result), 'step', h[4])
    local job = h[5]
    local j = redis.call('HMGET', k('job', job), 'dedupe', 'project')
    if j[1] == '1' then
      result.object = job .. '/' .. h[7]
      redis.call('HSET', k('results', j[2]), h[8] .. '|' .. result.class, cjson.encode(result))
    end
    release_dependents(job, tonumber(h[6]), result.sha256)
    return {'ok', end_lease(tid, OUTCOME_COMPLETED, FAULT_NONE, '', TASK_COMPLETED, EV_COMPLETED, false,
      result.render_ms or 0, j[2]), job}
  end
  local f = redis.call('HMGET', t, 'state', 'epoch', 'attempts', 'job', 'index')
  if f[1] == TASK_COMPLETED and tonumber(f[2]) == epoch then
    local attempts = cjson.decode(f[3])
    if attempts[#attempts].worker == worker then return {'ok', '', f[4]} end
  end
  local reason = stale_reason(tid, worker, epoch)
  event(f[4], EV_STALE_REFUSED, tid, tonumber(f[5]), worker, epoch, FAULT_NONE, reason)
  return {'stale', reason}
end
