-- Accepts a result if the worker holds the lease under the epoch; a replay of
-- the same accepted completion is accepted again; anything else is stale.
-- Returns {'ok', finished job state or '', job}, {'stale', reason}, {'bound'} or {'missing'}.
-- Called by dispatch.lua, alone or with other calls in one run.
local function complete(worker, tid, epoch, result_json, owner)
  -- The worker's owner and class in one read.
  local w = redis.call('HMGET', k('worker', worker), 'owner', 'class')
  if not owner_allows(w[1], owner) then return {'bound'} end
  local t = k('task', tid)
  -- Whether the task exists and the worker holds it, what a completion
  -- writes and what end_lease needs, in one read: end_lease_fields, then
  -- state, steps, file and rhash.
  local h = redis.call('HMGET', t, 'job', 'index', 'model', 'holder', 'epoch', 'attempts', 'avoid',
    'state', 'steps', 'file', 'rhash')
  if not h[8] then return {'missing'} end
  local job, index, holder, steps, file, rhash = h[1], h[2], h[4], h[9], h[10], h[11]
  if h[8] == TASK_LEASED and tonumber(h[5]) == epoch and holder == worker then
    -- The store records the worker's class with the result.
    local result = cjson.decode(result_json)
    result.class = w[2] or ''
    local j = redis.call('HMGET', k('job', job), 'dedupe', 'project')
    local stored = cjson.encode(result)
    if j[1] == '1' then
      result.object = job .. '/' .. file
      redis.call('HSET', k('results', j[2]), rhash .. '|' .. result.class, cjson.encode(result))
    end
    release_dependents(job, tonumber(index), result.sha256)
    return {'ok', end_lease(tid, OUTCOME_COMPLETED, FAULT_NONE, '', TASK_COMPLETED, EV_COMPLETED, false,
      result.render_ms or 0, j[2], h, {'result', stored, 'step', steps}), job}
  end
  if h[8] == TASK_COMPLETED and tonumber(h[5]) == epoch then
    local attempts = cjson.decode(h[6])
    if attempts[#attempts].worker == worker then return {'ok', '', job} end
  end
  local reason = stale_reason(tid, worker, epoch)
  event(job, EV_STALE_REFUSED, tid, tonumber(index), worker, epoch, FAULT_NONE, reason)
  return {'stale', reason}
end
