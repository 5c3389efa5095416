-- Claims up to ARGV[3] webhook deliveries that are due, each for ARGV[4] ms,
-- counting one more attempt. Returns DELIVERY_FIELDS values per delivery:
-- job, attempt, pending targets (JSON), ms since the job ended.
local max, lease = tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
for _, job in ipairs(redis.call('ZRANGEBYSCORE', k('outbox'), '-inf', NOW, 'LIMIT', 0, max)) do
  local f = redis.call('HMGET', k('outbox', job), 'pending', 'ended')
  if not f[1] then
    redis.call('ZREM', k('outbox'), job)
  else
    local attempt = redis.call('HINCRBY', k('outbox', job), 'attempt', 1)
    redis.call('ZADD', k('outbox'), NOW + lease, job)
    table.insert(out, job)
    table.insert(out, attempt)
    table.insert(out, f[1])
    table.insert(out, NOW - tonumber(f[2]))
  end
end
return out
