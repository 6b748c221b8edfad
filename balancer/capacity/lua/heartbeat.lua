-- Live replicas: a sorted set of replica ids scored by the Redis clock.
-- KEYS[1]  the set;  ARGV  replica id ("" only counts), ttl seconds, key ttl seconds
-- Returns  the number of replicas seen within the last ttl seconds.

if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local oldest = string.format('%.17g', now - tonumber(ARGV[2]))
if ARGV[1] == '' then
  return redis.call('ZCOUNT', KEYS[1], '(' .. oldest, '+inf')
end
redis.call('ZADD', KEYS[1], string.format('%.17g', now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', oldest)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return redis.call('ZCARD', KEYS[1])
