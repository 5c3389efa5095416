-- Records what one claim of a webhook delivery achieved.
-- ARGV: 3 job, 4 attempt, 5 delivered targets (JSON), 6 retry (1/0), 7 retry in ms.
-- The delivered targets leave the pending list; with retry, the rest is due
-- again after ARGV[7] ms, else the delivery is closed. A settle under an older
-- attempt than the latest claim's only records its deliveries.
local job = ARGV[3]
local ob = k('outbox', job)
local f = redis.call('HMGET', ob, 'pending', 'attempt')
if not f[1] then return 0 end
local delivered = {}
for _, t in ipairs(cjson.decode(ARGV[5])) do delivered[t] = true end
local left = {}
for _, t in ipairs(cjson.decode(f[1])) do
  if not delivered[t] then table.insert(left, t) end
end
local latest = tonumber(f[2]) == tonumber(ARGV[4])
if #left == 0 or (latest and ARGV[6] ~= '1') then
  redis.call('DEL', ob)
  redis.call('ZREM', k('outbox'), job)
  return 1
end
redis.call('HSET', ob, 'pending', cjson.encode(left))
if latest then
  redis.call('ZADD', k('outbox'), NOW + tonumber(ARGV[7]), job)
end
return 1
